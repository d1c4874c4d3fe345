"""Batch submission: N Jobs through the batch service vs N created directly, same run.

Against the real control plane (tools/cluster: kube-apiserver, etcd, Kueue) and
a real JupyterHub for the service's token checks. The service runs as its own
process (``python -m labfleet_batch.service``, Kubernetes backend) so its RSS
can be sampled: at rest, peak under load, after. The baseline creates the same
Job bodies with ``kubernetes_asyncio``'s ``BatchV1Api.create_namespaced_job``.
Both sides use the same concurrency and the same LocalQueue (two interleaved
halves each: direct, service, direct, service), whose
ClusterQueue has no quota: Kueue creates a Workload per Job but admits none,
so no pods are started and both sides pay the same Kueue cost.

    .venv/bin/python -m benchmarks.batch -n 1000 [--concurrency 16]
    LABFLEET_CLUSTER_STATE=/tmp/cluster ...   # reuse a running cluster
    ... --profile /tmp/service.prof             # cProfile the service (slower; diagnosis only)

The service's CPU time over its halves is reported per submission
(``service_cpu_ms_per_submit``): on a small shared machine the service competes
for the same cores as the API server, so its CPU per request decides the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml
from kubernetes_asyncio import client as k8s
from labfleet_batch import jobs as jobbuilder
from labfleet_batch.queues import parse_queue_config, sync_queues
from labfleet_batch.validation import validate_request
from labfleet_hub.kubeclient import KubeAPI
from labfleet_spawner.catalogue import load_catalogue
from tornado.httpclient import AsyncHTTPClient

from tests.batch.hub import BATCH_SCOPE, start_hub, stop_hub
from tests.conftest import free_port
from tests.k8s.k8s_helpers import clusterlib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "batch.json"
REQUEST = {"name": "bench", "script": "echo hello", "size": "small"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float], wall: float) -> dict:
    return {
        "jobs": len(latencies),
        "wall_s": round(wall, 3),
        "throughput_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(pct(latencies, 0.5) * 1000, 2),
        "p95_ms": round(pct(latencies, 0.95) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


async def run_pool(n: int, concurrency: int, one) -> tuple[list[float], float]:
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker():
        for i in counter:
            t0 = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def api_client(cluster) -> k8s.ApiClient:
    conf = k8s.Configuration(host=cluster.server)
    conf.api_key = {"BearerToken": f"Bearer {cluster.token}"}
    conf.ssl_ca_cert = str(cluster.ca_file)
    return k8s.ApiClient(conf)


#: Runs the service under cProfile and writes the stats when the benchmark terminates it.
PROFILE_WRAPPER = """
import cProfile, signal, sys
from labfleet_batch.service import main
out = sys.argv.pop(1)
prof = cProfile.Profile()
def stop(*_):
    prof.disable()
    prof.dump_stats(out)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
prof.enable()
main(sys.argv[1:])
"""


def start_service(
    workdir: Path, cluster, hub, catalogue_path: Path, queues: dict, profile: str = ""
) -> tuple:
    port = free_port()
    (workdir / "queues.yaml").write_text(yaml.safe_dump(queues))
    (workdir / "batch_config.py").write_text(
        "c = get_config()  # noqa\n"
        "c.BatchService.backend = 'kubernetes'\n"
        f"c.BatchService.kubeconfig = {str(cluster.kubeconfig)!r}\n"
        f"c.BatchService.catalogue_path = {str(catalogue_path)!r}\n"
        f"c.BatchService.queues_path = {str(workdir / 'queues.yaml')!r}\n"
        "c.BatchService.pod_storage = {'volume': {'emptyDir': {}}}\n"
        # as labfleet up configures it: Jobs run with their owner's hub ids
        "c.BatchService.job_ids_from_hub = True\n"
        # throughput of submissions, not the caps on waiting jobs (every job here waits)
        "c.BatchService.max_waiting_per_user = 0\n"
        "c.BatchService.max_waiting_per_group = 0\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")},
        "JUPYTERHUB_API_TOKEN": hub.batch_token,
        "JUPYTERHUB_API_URL": hub.url,
        "JUPYTERHUB_SERVICE_NAME": "batch",
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/batch/",
        "JUPYTERHUB_OAUTH_ACCESS_SCOPES": json.dumps([BATCH_SCOPE]),
    }
    log = open(workdir / "service.log", "wb")
    run = ["-c", PROFILE_WRAPPER, profile] if profile else ["-m", "labfleet_batch.service"]
    proc = subprocess.Popen(
        [sys.executable, *run, "--config", str(workdir / "batch_config.py")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/services/batch/"
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError((workdir / "service.log").read_text()[-2000:])
        try:
            urllib.request.urlopen(url + "health", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("batch service did not start")


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.05):
        self.proc, self.interval, self.peak, self._task = psutil.Process(pid), interval, 0, None

    def now(self) -> int:
        return self.proc.memory_info().rss

    async def _run(self):
        while True:
            self.peak = max(self.peak, self.now())
            await asyncio.sleep(self.interval)

    def __enter__(self):
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


async def bench(n: int, concurrency: int, cluster, hub, workdir: Path, profile: str = "") -> dict:
    catalogue_path = ROOT / "config" / "catalogue.yaml"
    catalogue = load_catalogue(catalogue_path)
    s = os.urandom(3).hex()
    group = f"bench{s}"
    queues = {"name_prefix": f"bn{s}-", "namespace_prefix": f"bn{s}-", "cohort": "",
              "groups": {group: {"cpu": 0, "memory": "0"}}}  # fmt: skip
    config = parse_queue_config(queues, catalogue)
    admin = api_client(cluster)
    await sync_queues(KubeAPI(admin), config, catalogue)
    user = f"bencher{s}"
    token = hub.add_user(user, [group])

    # the same Job bodies for the direct side
    request = validate_request(
        {**REQUEST, "group": group},
        catalogue=catalogue,
        user_groups=[group],
        queue_groups=config.covered_accelerators(),
        priorities=config.priorities,
    )
    ctx = jobbuilder.JobContext(
        user=user,
        namespace=config.namespace(group),
        queue=config.local_queue(group),
        priority_class=config.priority_class(request.priority),
    )
    batch_api = k8s.BatchV1Api(admin)

    async def direct(i: int):
        body = jobbuilder.make_job(request, ctx, jobbuilder.new_job_name("direct"))
        await batch_api.create_namespaced_job(ctx.namespace, body)

    proc, url = start_service(workdir, cluster, hub, catalogue_path, queues, profile)
    http = AsyncHTTPClient(max_clients=concurrency)
    headers = {"Authorization": f"token {token}"}
    body = json.dumps({**REQUEST, "group": group})

    async def via_service(i: int):
        resp = await http.fetch(url + "api/jobs", method="POST", body=body, headers=headers)
        assert resp.code == 201

    try:
        await via_service(-1)  # warm: HubAuth cache, API connection
        await direct(-1)
        await asyncio.sleep(1)
        sampler_proc = psutil.Process(proc.pid)
        rss_rest = sampler_proc.memory_info().rss
        # two interleaved halves per side: neither side always meets Kueue's backlog
        direct_lat, svc_lat, direct_wall, svc_wall = [], [], 0.0, 0.0
        svc_cpu = 0.0
        with RssSampler(proc.pid) as sampler:
            for half in (n // 2, n - n // 2):
                lat, wall = await run_pool(half, concurrency, direct)
                direct_lat += lat
                direct_wall += wall
                before = sum(sampler_proc.cpu_times()[:2])
                lat, wall = await run_pool(half, concurrency, via_service)
                svc_cpu += sum(sampler_proc.cpu_times()[:2]) - before
                svc_lat += lat
                svc_wall += wall
        await asyncio.sleep(1)
        rss_after = sampler_proc.memory_info().rss
        listing = await KubeAPI(admin).request(
            "GET", f"/apis/batch/v1/namespaces/{ctx.namespace}/jobs", query={"limit": "1"}
        )
        remaining = listing["metadata"].get("remainingItemCount", 0) + len(listing["items"])
    finally:
        proc.terminate()
        proc.wait(10)
        await admin.close()
        cluster.kubectl("delete", "namespace", config.namespace(group), "--wait=false", check=False)
    d, sv = summary(direct_lat, direct_wall), summary(svc_lat, svc_wall)
    return {
        "benchmark": "batch",
        "n": n,
        "concurrency": concurrency,
        "jobs_in_namespace_after": remaining,
        "direct_kubernetes_client": d,
        "through_service": sv,
        "throughput_ratio_service_vs_direct": round(
            sv["throughput_per_s"] / d["throughput_per_s"], 3
        ),
        "p95_ratio_service_vs_direct": round(sv["p95_ms"] / d["p95_ms"], 3),
        "service_cpu_ms_per_submit": round(svc_cpu * 1000 / n, 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "service_rss_mib": {
            "at_rest": round(rss_rest / 2**20, 1),
            "peak_under_load": round(max(sampler.peak, rss_after) / 2**20, 1),
            "after_load": round(rss_after / 2**20, 1),
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "kubernetes": clusterlib.versions()["K8S_VERSION"],
            "kueue": clusterlib.versions()["KUEUE_VERSION"],
        },
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks.batch")
    parser.add_argument("-n", type=int, default=1000, help="jobs per side")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--profile", default="", help="write the service's cProfile stats here")
    parser.add_argument("--repeat", type=int, default=1, help="runs on the same cluster")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-batch-") as tmp:
        tmp = Path(tmp)
        reuse = os.environ.get("LABFLEET_CLUSTER_STATE")
        if reuse:
            cluster, started = clusterlib.Cluster.from_state(Path(reuse)), False
        else:
            print("==> starting the test cluster", flush=True)
            cluster, started = clusterlib.start_cluster(tmp / "cluster", die_with_parent=True), True
        hub = start_hub(tmp / "hub")
        try:
            runs = []
            for i in range(args.repeat):
                print(f"==> run {i + 1}: {args.n} Jobs direct and {args.n} through the service",
                      flush=True)  # fmt: skip
                runs.append(
                    asyncio.run(bench(args.n, args.concurrency, cluster, hub, tmp, args.profile))
                )
                print(json.dumps({k: runs[-1][k] for k in (
                    "throughput_ratio_service_vs_direct", "p95_ratio_service_vs_direct",
                    "service_cpu_ms_per_submit")}), flush=True)  # fmt: skip
            result = runs[-1] if len(runs) == 1 else {"runs": runs}
        finally:
            stop_hub(hub)
            if started:
                clusterlib.stop_cluster(tmp / "cluster")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
