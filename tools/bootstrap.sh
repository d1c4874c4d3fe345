#!/usr/bin/env bash
# Everything labfleet needs on a fresh machine, installed once and reused, and
# all of it before any test or service runs (no test may depend on another
# having installed something first):
#   - Debian packages: nss_wrapper (account names for the per-user uids) when
#     run as root, plus $LABFLEET_SYSTEM_PACKAGES (tools/test.sh asks for
#     Chromium, PostgreSQL, Prometheus, OpenSSL);
#   - the virtualenv .venv with the project installed editable;
#   - the Node.js pieces (configurable-http-proxy, the development identity
#     provider) into ${LABFLEET_CACHE:-~/.cache/labfleet} (`labfleet setup`).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

want_system=${LABFLEET_SYSTEM_PACKAGES:-}
# as root the local spawner runs notebooks under per-user uids: nss_wrapper gives
# them names (whoami, the prompt, ls -l) without touching /etc/passwd
[ "$(id -u)" = 0 ] && want_system="libnss-wrapper $want_system"
missing=()
for pkg in $want_system; do
  case $pkg in
    chromium) command -v chromium >/dev/null || missing+=(chromium) ;;
    postgresql) ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql) ;;
    prometheus) command -v prometheus >/dev/null || missing+=(prometheus) ;;
    openssl) command -v openssl >/dev/null || missing+=(openssl) ;;
    libnss-wrapper) ls /usr/lib/*/libnss_wrapper.so >/dev/null 2>&1 || missing+=(libnss-wrapper) ;;
  esac
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "labfleet: please install these Debian packages: ${missing[*]}" >&2
    exit 1
  fi
fi

command -v node >/dev/null && command -v npm >/dev/null || {
  echo "labfleet: Node.js and npm are required (configurable-http-proxy, dev identity provider)" >&2
  exit 1
}

# Container images (labfleet images build, tests/images): podman and buildah
# build them, mmdebstrap makes their Debian base, runc runs the build steps
# (crun refuses these VMs' hybrid cgroups); uidmap, fuse-overlayfs and
# slirp4netns are what the same needs without root. containerd and the CNI
# plugins (bridge, host-local) run the test cluster's real node
# (tools/cluster/node.py) with the same runc. Installed as root only:
# elsewhere the image tests say what is missing. apt may be busy with another
# install: wait for its lock. `apt-get update` only when apt knows a package
# by no candidate (a machine whose lists were cleaned).
apt_locked_retry() {
  local try out
  for try in $(seq 1 60); do
    if out=$("$@" 2>&1); then return 0; fi
    case $out in
      *"Could not get lock"* | *"Unable to acquire"* | *"Unable to lock"*) sleep 5 ;;
      *) printf '%s\n' "$out" >&2; return 1 ;;
    esac
  done
  printf '%s\n' "$out" >&2
  return 1
}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  image_pkgs=()
  for pkg in podman buildah mmdebstrap runc uidmap fuse-overlayfs slirp4netns \
    containerd containernetworking-plugins; do
    case $pkg in
      uidmap) command -v newuidmap >/dev/null || image_pkgs+=(uidmap) ;;
      containernetworking-plugins) [ -x /usr/lib/cni/bridge ] || image_pkgs+=("$pkg") ;;
      *) command -v "$pkg" >/dev/null || image_pkgs+=("$pkg") ;;
    esac
  done
  if [ ${#image_pkgs[@]} -gt 0 ]; then
    say "installing Debian packages for the container images: ${image_pkgs[*]}"
    if apt-cache policy "${image_pkgs[@]}" 2>/dev/null | grep -q 'Candidate: (none)' \
      || [ "$(apt-cache policy "${image_pkgs[@]}" 2>/dev/null | grep -c 'Candidate:')" -lt ${#image_pkgs[@]} ]; then
      apt_locked_retry apt-get update -qq
    fi
    DEBIAN_FRONTEND=noninteractive apt_locked_retry \
      apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${image_pkgs[@]}"
  fi
  # podman's settings for these machines, only when missing or different
  if command -v podman >/dev/null; then python3 tools/podman_conf.py; fi
fi

# Debian's Python lives where every uid can read it, so the local spawner can
# run each user's notebook under that user's own uid (isolate_users: auto).
PY=${PYTHON:-}
for candidate in /usr/bin/python3.11 python3.11 python3; do
  [ -n "$PY" ] && break
  command -v "$candidate" >/dev/null && PY=$candidate
done
if [ ! -x .venv/bin/python ]; then
  say "creating the virtualenv .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.labfleet-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing labfleet and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi

# configurable-http-proxy and the identity provider's npm packages, now rather
# than on first use
.venv/bin/labfleet setup
