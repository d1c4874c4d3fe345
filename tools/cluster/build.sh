#!/usr/bin/env bash
# Build the test-cluster binaries (etcd, Kubernetes control plane, kubelet and
# kube-proxy, kwok, Kueue) from Go modules, with CGO disabled, and the real
# node's static `pause` (gcc, from the k8s.io/kubernetes module's source).
# Idempotent: every component is built into ${LABFLEET_CACHE:-$HOME/.cache/labfleet}/cluster/<component>-<version>/
# and skipped when that folder is already complete.  The Go module and build
# caches (GOMODCACHE, GOCACHE) are left at their defaults and kept, so a
# rebuild after wiping the binary cache takes a few minutes, not half an hour.
#
# Usage: tools/cluster/build.sh [--print-dirs] [--force] [component ...]
#   components: etcd kubernetes pause kwok kueue helm  (default: all of them;
#               pause only where gcc is installed)
#   --print-dirs  only print "component=dir" lines for the configured versions
#   --force       rebuild even if the cached binaries exist
# Environment:
#   LABFLEET_CACHE        cache root (default $HOME/.cache/labfleet)
#   LABFLEET_BUILD_JOBS   go build -p (default 2; keeps peak memory down)
#   LABFLEET_BUILD_HELM=0 skip helm in the default set (the cluster does not need it)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"
CACHE="${LABFLEET_CACHE:-$HOME/.cache/labfleet}/cluster"
JOBS="${LABFLEET_BUILD_JOBS:-2}"

declare -A VERSION=(
  [etcd]="$ETCD_VERSION" [kubernetes]="$K8S_VERSION-r${K8S_BUILD_REV:-1}"
  [pause]="$K8S_VERSION-r${PAUSE_BUILD_REV:-1}" [kwok]="$KWOK_VERSION"
  [kueue]="$KUEUE_VERSION-r${KUEUE_BUILD_REV:-1}" [helm]="$HELM_VERSION"
)
declare -A BINARIES=(
  [etcd]="etcd"
  [kubernetes]="kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy"
  [kwok]="kwok" [kueue]="kueue" [helm]="helm"
)

dir_of() { echo "$CACHE/$1-${VERSION[$1]}"; }

force=0
print_dirs=0
components=()
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --print-dirs) print_dirs=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    etcd|kubernetes|pause|kwok|kueue|helm) components+=("$arg") ;;
    *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done
if [ ${#components[@]} -eq 0 ]; then
  components=(etcd kubernetes kwok kueue)
  # the real node's sandbox image; the KWOK-only cluster does not need it
  if command -v gcc >/dev/null 2>&1; then components+=(pause); fi
  if [ "${LABFLEET_BUILD_HELM:-1}" != 0 ]; then components+=(helm); fi
fi

if [ "$print_dirs" = 1 ]; then
  for c in "${components[@]}"; do echo "$c=$(dir_of "$c")"; done
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "build.sh: 'go' not found in PATH (need Go >= 1.26 to build etcd $ETCD_VERSION)" >&2
  exit 3
fi

mkdir -p "$CACHE"
# Serialise concurrent builds (make + pytest fixture started together).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.build.lock"
  flock 9
fi

export CGO_ENABLED=0
log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

is_complete() { [ -f "$(dir_of "$1")/.complete" ]; }

# go_build <module dir> <output> <package> <ldflags>
go_build() {
  local moddir="$1" out="$2" pkg="$3" ldflags="$4" timefile="$2.time"
  local -a timer=()
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -v -o "$timefile")
  local start=$SECONDS
  (cd "$moddir" && "${timer[@]}" go build -p "$JOBS" -trimpath \
      -ldflags "-s -w $ldflags" -o "$out" "$pkg")
  local secs=$((SECONDS - start)) rss=""
  if [ -f "$timefile" ]; then
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f MiB", $2/1024}' "$timefile")
  fi
  log "  built $(basename "$out") in ${secs}s (peak RSS of largest process: ${rss:-n/a})"
  local comp; comp="$(basename "$(dirname "$out")")"; comp="${comp%.tmp.*}"
  printf '%s\t%s\t%s\t%ss\t%s\n' "$(date -u +%FT%TZ)" "$comp" "$(basename "$out")" "$secs" "${rss:-n/a}" \
    >>"$CACHE/build-times.tsv"
}

k8s_ldflags() {
  local v="${K8S_VERSION}" major minor
  major="${v#v}"; major="${major%%.*}"
  minor="${v#v*.}"; minor="${minor%%.*}"
  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local flags="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  echo "$flags"
}

build_component() {
  local c="$1" dest tmp moddir
  dest="$(dir_of "$c")"
  if [ "$force" = 0 ] && is_complete "$c"; then
    log "$c ${VERSION[$c]}: cached in $dest"
    return 0
  fi
  moddir="$HERE/go/$c"
  tmp="$dest.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  if [ "$c" != pause ]; then
    log "$c ${VERSION[$c]}: downloading modules"
    (cd "$moddir" && go mod download)
  else
    (cd "$HERE/go/kubernetes" && go mod download k8s.io/kubernetes)
  fi
  case "$c" in
    etcd)
      log "$c: building etcd"
      go_build "$moddir" "$tmp/etcd" go.etcd.io/etcd/server/v3 "" ;;
    kubernetes)
      local flags b; flags="$(k8s_ldflags)"
      for b in ${BINARIES[kubernetes]}; do
        log "$c: building $b"
        go_build "$moddir" "$tmp/$b" "k8s.io/kubernetes/cmd/$b" "$flags"
      done ;;
    pause)
      # The sandbox ("pause") container of the real node: Kubernetes' own
      # build/pause/linux/pause.c, static, so the image is this one file.
      local src
      src="$(cd "$HERE/go/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
      log "$c: gcc -static $src/build/pause/linux/pause.c"
      local start=$SECONDS
      gcc -Os -static -Wall -Werror -DVERSION="${K8S_VERSION}-labfleet" \
        -o "$tmp/pause" "$src/build/pause/linux/pause.c"
      strip "$tmp/pause" 2>/dev/null || true
      printf '%s\t%s\t%s\t%ss\t%s\n' "$(date -u +%FT%TZ)" pause pause "$((SECONDS - start))" n/a \
        >>"$CACHE/build-times.tsv" ;;
    kwok)
      log "$c: building kwok"
      go_build "$moddir" "$tmp/kwok" sigs.k8s.io/kwok/cmd/kwok \
        "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" ;;
    kueue)
      local src
      src="$(cd "$moddir" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
      # Kueue reads its metrics TLS pair from the fixed path /etc/kueue/metrics/certs
      # when internal cert management is off.  Out of cluster (and without root)
      # that path is unusable, so build a copy of cmd/kueue/main.go (a single
      # file, no internal imports) inside the wrapper module, patched to honour
      # $KUEUE_METRICS_CERT_DIR first.  Nothing else changes.  (go build
      # -overlay refuses files under GOMODCACHE.)
      local gen="$moddir/gen/kueue"
      rm -rf "$gen"; mkdir -p "$gen"
      sed 's|metricsCertPath := "/etc/kueue/metrics/certs"|metricsCertPath := "/etc/kueue/metrics/certs"; if d := os.Getenv("KUEUE_METRICS_CERT_DIR"); d != "" { metricsCertPath = d }|' \
        "$src/cmd/kueue/main.go" >"$gen/main.go"
      if ! grep -q KUEUE_METRICS_CERT_DIR "$gen/main.go"; then
        echo "build.sh: could not patch the metrics cert path in $src/cmd/kueue/main.go" >&2
        exit 4
      fi
      log "$c: building kueue manager (metrics cert dir overridable via KUEUE_METRICS_CERT_DIR)"
      # The visibility server (an aggregated API) loads its TLS pair from the
      # fixed directory /visibility when internal cert management is off; the
      # path is a plain string variable, so -X makes it relative: cluster.py
      # starts Kueue in the cluster's state dir, which holds visibility-certs/.
      go_build "$moddir" "$tmp/kueue" ./gen/kueue \
        "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION -X sigs.k8s.io/kueue/pkg/visibility.certDir=visibility-certs"
      rm -rf "$moddir/gen"
      mkdir -p "$tmp/crds"
      cp "$src"/config/components/crd/bases/*.yaml "$tmp/crds/"
      cp "$src/config/components/webhook/manifests.yaml" "$tmp/webhook-manifests.yaml"
      mkdir -p "$tmp/visibility"
      cp "$src"/config/components/visibility/apiservice_*.yaml "$tmp/visibility/"
      chmod -R u+w "$tmp/visibility"
      chmod u+w "$tmp/webhook-manifests.yaml"
      chmod -R u+w "$tmp/crds"
      log "$c: copied $(ls "$tmp/crds" | wc -l) CRDs from $src" ;;
    helm)
      log "$c: building helm"
      go_build "$moddir" "$tmp/helm" helm.sh/helm/v3/cmd/helm \
        "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" ;;
  esac
  date -u +%Y-%m-%dT%H:%M:%SZ >"$tmp/.complete"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  log "$c ${VERSION[$c]}: ready in $dest"
}

total_start=$SECONDS
n=0
for c in "${components[@]}"; do
  n=$((n + 1))
  log "component $n/${#components[@]}: $c ${VERSION[$c]}"
  build_component "$c"
done
log "all done in $((SECONDS - total_start))s; binaries under $CACHE"
