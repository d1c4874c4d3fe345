"""Run every benchmark (``make bench``); each writes JSON under benchmarks/results/."""

import sys

from benchmarks import login_latency


def main() -> int:
    print("==> login-to-JupyterLab latency: labfleet vs stock JupyterHub", flush=True)
    login_latency.main(sys.argv[1:] or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
