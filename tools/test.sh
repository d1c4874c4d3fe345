#!/usr/bin/env bash
# The README's test command (`make test`): set up, then run every suite.
#   unit/        no network
#   integration/ real hub, proxy, identity provider and headless Chromium
#   k8s/         real control plane built from Go modules (tools/cluster)
#   images/      labfleet's container images, built with podman on a Debian
#                base made with mmdebstrap (labfleet images build)
# With CI=true nothing may be skipped for a missing toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
# the browser tests need Chromium; accounting needs PostgreSQL and Prometheus
started=$SECONDS
LABFLEET_SYSTEM_PACKAGES="chromium postgresql prometheus openssl" bash tools/bootstrap.sh
echo "==> set-up (Debian packages, .venv, Node.js pieces) took $((SECONDS - started)) s"

if command -v go >/dev/null && [ -x tools/cluster/build.sh ]; then
  echo "==> building (or reusing) the test cluster binaries"
  bash tools/cluster/build.sh
elif [ "${CI:-}" = true ]; then
  echo "labfleet: CI=true but Go is missing: the k8s suite cannot run" >&2
  exit 1
fi

if command -v podman >/dev/null && command -v mmdebstrap >/dev/null; then
  echo "==> building (or reusing) the container images"
  started=$SECONDS
  .venv/bin/labfleet images build hub services singleuser singleuser-cuda
  echo "==> images took $((SECONDS - started)) s"
elif [ "${CI:-}" = true ]; then
  echo "labfleet: CI=true but podman or mmdebstrap is missing: the images cannot be built" >&2
  exit 1
fi

echo "==> lint (ruff check, ruff format --check)"
.venv/bin/ruff check . && .venv/bin/ruff format --check .

echo "==> running the test suites"
exec .venv/bin/python -m pytest tests -q -ra "$@"
