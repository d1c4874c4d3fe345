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
