"""Run every benchmark (``make bench``); each writes JSON under benchmarks/results/."""

import sys

from benchmarks import accounting, availability, batch, kube_spawn, login_latency


def main() -> int:
    print("==> login-to-JupyterLab latency: labfleet vs stock JupyterHub", flush=True)
    login_latency.main(sys.argv[1:] or None)
    print("==> accounting: ingestion, report latency, collector memory", flush=True)
    accounting.main([])
    print("==> spawn-form availability: watch cache vs list-per-render", flush=True)
    availability.main([])
    print("==> batch: 1,000 Jobs through the batch service vs direct creation", flush=True)
    batch.main([])
    print("==> Kubernetes spawn: PlatformKubeSpawner vs stock KubeSpawner", flush=True)
    kube_spawn.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
