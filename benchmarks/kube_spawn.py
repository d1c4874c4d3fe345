"""Hub-side spawn overhead: PlatformKubeSpawner vs stock KubeSpawner, same cluster, same run.

Against the real control plane (tools/cluster: kube-apiserver, scheduler,
Kueue's webhooks, KWOK nodes). Each round starts one server with each
spawner, in alternating order, and times ``await spawner.start()``: from the
call until KubeSpawner has seen the pod Running (created, admitted by the
webhooks, bound by kube-scheduler, marked Running by KWOK), then stops it.
The stock KubeSpawner gets an equivalent pod by hand: the catalogue's image,
CPU and memory as request and limit, one ``nvidia.com/gpu``, the T4 node
selector and the GPU toleration. One warm-up round per side (the pod
reflector's first list) is discarded.

Also timed, without the API server: building the pod manifest
(``get_pod_manifest``, after ``load_user_options``) for each spawner, which is
where labfleet's builders run.

    .venv/bin/python -m benchmarks.kube_spawn --rounds 40
    LABFLEET_CLUSTER_STATE=/tmp/cluster ...   # reuse a running cluster
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from jupyterhub.objects import Hub
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import watch
from kubernetes_asyncio.config import kube_config
from kubespawner import KubeSpawner
from kubespawner.clients import load_config
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.kube import PlatformKubeSpawner

from tests.k8s.k8s_helpers import clusterlib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kube_spawn.json"
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
OPTIONS = {"profile": "gpu-t4", "size": "small"}
SHARED = {"hostPath": {"path": "/srv/labfleet", "type": "DirectoryOrCreate"}}

_ids = iter(range(1000, 1_000_000))


def make_user() -> SimpleNamespace:
    name = "b" + uuid.uuid4().hex[:7]
    return SimpleNamespace(
        name=name,
        id=next(_ids),
        escaped_name=name,
        url=f"/user/{name}/",
        groups=[SimpleNamespace(name="users", id=10), SimpleNamespace(name="ml", id=11)],
    )


def common(namespace: str) -> dict:
    return {
        "hub": Hub(),
        "api_token": "bench-token",
        "oauth_client_id": "jupyterhub-user-bench",
        "namespace": namespace,
        "start_timeout": 60,
        "events_enabled": False,
    }


def platform_spawner(namespace: str) -> PlatformKubeSpawner:
    spawner = PlatformKubeSpawner(
        user=make_user(), catalogue_data=CATALOGUE, shared_volume=SHARED, **common(namespace)
    )
    spawner.user_options = dict(OPTIONS)
    return spawner


def stock_spawner(namespace: str) -> KubeSpawner:
    """Stock KubeSpawner configured by hand for the pod the catalogue's T4 profile asks for."""
    selection = platform_spawner(namespace).apply_selection(dict(OPTIONS))
    accelerator = selection.accelerator
    return KubeSpawner(
        user=make_user(),
        image=selection.image.image,
        cpu_limit=float(selection.size.cpu),
        cpu_guarantee=float(selection.size.cpu),
        mem_limit=selection.size.memory_bytes,
        mem_guarantee=selection.size.memory_bytes,
        extra_resource_limits={accelerator.resource: "1"},
        extra_resource_guarantees={accelerator.resource: "1"},
        node_selector=dict(accelerator.node_labels),
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        **common(namespace),
    )


async def stock_same_pod_spawner(namespace: str) -> KubeSpawner:
    """Stock KubeSpawner creating labfleet's exact pod (through its own modify_pod_hook).

    The pod is built beforehand by a PlatformKubeSpawner (not timed), so this
    side pays the API server and scheduler cost of the same pod and only stock
    KubeSpawner's hub-side work: the difference to "labfleet" is labfleet's
    hub-side overhead alone.
    """
    ref = platform_spawner(namespace)
    await ref.load_user_options()
    pod = await ref.get_pod_manifest()
    spawner = stock_spawner(namespace)

    def same_pod(spawner, _pod):
        pod.metadata.name = spawner.pod_name
        return pod

    spawner.modify_pod_hook = same_pod
    return spawner


def stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1000, 2),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000, 2),
        "min_ms": round(ordered[0] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


class RunningWatch:
    """When each pod of a namespace was first seen Running, from our own watch.

    KubeSpawner's ``start()`` notices Running by polling its reflector with a
    growing back-off, which rounds both sides' times up by tens of ms; this
    watch gives the moment the API server reported Running, to a few ms.
    """

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.seen: dict[str, float] = {}
        self.created: dict[str, float] = {}
        self.node: dict[str, str] = {}
        self._task: asyncio.Task | None = None

    async def __aenter__(self):
        await kube_config.load_kube_config()
        self._client = k8s.ApiClient()
        self._task = asyncio.ensure_future(self._run(k8s.CoreV1Api(self._client)))
        return self

    async def _run(self, api) -> None:
        while True:
            async with watch.Watch().stream(
                api.list_namespaced_pod, self.namespace, timeout_seconds=300
            ) as stream:
                async for event in stream:
                    pod = event["object"]
                    self.created.setdefault(pod.metadata.name, time.perf_counter())
                    if pod.spec and pod.spec.node_name:
                        self.node[pod.metadata.name] = pod.spec.node_name
                    if pod.status and pod.status.phase == "Running":
                        self.seen.setdefault(pod.metadata.name, time.perf_counter())

    async def running_at(self, name: str) -> tuple[float, float]:
        """(first seen at all, i.e. created; first seen Running)."""
        for _ in range(500):
            if name in self.seen:
                return self.created[name], self.seen[name]
            await asyncio.sleep(0.01)
        raise TimeoutError(f"pod {name} never seen Running")

    async def __aexit__(self, *exc):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.close()


async def one_start(make, namespace: str, running: RunningWatch) -> tuple[float, float, float]:
    """Seconds from start() to (pod created, pod Running, start() returned)."""
    spawner = make(namespace)
    if inspect.isawaitable(spawner):
        spawner = await spawner
    t0 = time.perf_counter()
    url = await spawner.start()
    returned = time.perf_counter() - t0
    assert url.startswith("http://127."), url  # KWOK's loopback pod CIDR
    created, to_running = await running.running_at(spawner.pod_name)
    # equivalent pods: every side's lands on the T4 node
    assert running.node.get(spawner.pod_name) == "gpu-t4-01", running.node.get(spawner.pod_name)
    await spawner.stop(now=True)
    return created - t0, to_running - t0, returned


async def manifest_time(make, namespace: str, n: int) -> float:
    """Median seconds of load_user_options + get_pod_manifest (no API call)."""
    times = []
    for _ in range(n):
        spawner = make(namespace)
        t0 = time.perf_counter()
        await spawner.load_user_options()
        await spawner.get_pod_manifest()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def bench(cluster, rounds: int, manifests: int) -> dict:
    namespace = "bench-spawn-" + uuid.uuid4().hex[:6]
    cluster.kubectl("create", "namespace", namespace)
    sides = {
        "labfleet": platform_spawner,
        "stock": stock_spawner,
        "stock_same_pod": stock_same_pod_spawner,
    }
    metrics = ("start_to_pod_created", "start_to_pod_running", "start_to_start_returned")
    times = {m: {name: [] for name in sides} for m in metrics}
    try:
        async with RunningWatch(namespace) as running:
            for make in sides.values():  # warm-up: reflectors list and start watching
                await one_start(make, namespace, running)
            for i in range(rounds):
                order = list(sides) if i % 2 == 0 else list(reversed(sides))  # ABC, CBA, ...
                for name in order:
                    measured = await one_start(sides[name], namespace, running)
                    for metric, value in zip(metrics, measured, strict=True):
                        times[metric][name].append(value)
        build = {
            name: await manifest_time(sides[name], namespace, manifests)
            for name in ("labfleet", "stock")
        }
    finally:
        await PlatformKubeSpawner.stop_watches()
        await KubeSpawner._stop_all_reflectors()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    result: dict = {"benchmark": "kube_spawn", "rounds": rounds, "profile": OPTIONS}
    for metric in metrics:
        per_side = {name: stats(values) for name, values in times[metric].items()}
        lab = per_side["labfleet"]["median_ms"]
        result[metric] = {
            **per_side,
            "median_ratio_labfleet_vs_stock": round(lab / per_side["stock"]["median_ms"], 3),
            "median_ratio_labfleet_vs_stock_same_pod": round(
                lab / per_side["stock_same_pod"]["median_ms"], 3
            ),
        }
    return {
        **result,
        "manifest_build_median_ms": {
            "labfleet": round(build["labfleet"] * 1000, 3),
            "stock": round(build["stock"] * 1000, 3),
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "kubernetes": clusterlib.versions()["K8S_VERSION"],
            "kueue": clusterlib.versions()["KUEUE_VERSION"],
        },
    }


def _point_clients_at(cluster) -> None:
    # kubernetes_asyncio reads $KUBECONFIG once at import; KubeSpawner caches load_config.
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(cluster.kubeconfig)
    os.environ.pop("KUBERNETES_SERVICE_HOST", None)
    load_config.cache_clear()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks.kube_spawn")
    parser.add_argument("--rounds", type=int, default=40, help="measured starts per spawner")
    parser.add_argument("--manifests", type=int, default=200, help="manifest builds per spawner")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-spawn-") as tmp:
        reuse = os.environ.get("LABFLEET_CLUSTER_STATE")
        if reuse:
            cluster, started = clusterlib.Cluster.from_state(Path(reuse)), False
        else:
            print("==> starting the test cluster", flush=True)
            state = Path(tmp) / "cluster"
            cluster, started = clusterlib.start_cluster(state, die_with_parent=True), True
        try:
            _point_clients_at(cluster)
            print(f"==> {args.rounds} starts per spawner, alternating", flush=True)
            result = asyncio.run(bench(cluster, args.rounds, args.manifests))
        finally:
            if started:
                clusterlib.stop_cluster(state)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
