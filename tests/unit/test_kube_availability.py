"""Availability on plain Node/Pod dicts (the test cluster's fleet), and the watch loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from labfleet_spawner.availability import (
    AvailabilityIndex,
    ClusterWatch,
    NodeInfo,
    compute_availability,
    pod_usage,
)
from labfleet_spawner.catalogue import load_catalogue

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(REPO / "config" / "catalogue.yaml")


def fleet_nodes() -> list[dict]:
    """Node objects as the API server returns them for tools/cluster/fleet.yaml."""
    fleet = yaml.safe_load((REPO / "tools" / "cluster" / "fleet.yaml").read_text())
    nodes = []
    for entry in fleet["nodes"]:
        capacity = {**fleet["defaults"]["capacity"], **entry.get("capacity", {})}
        nodes.append(
            {
                "metadata": {
                    "name": entry["name"],
                    "labels": {**fleet["defaults"]["labels"], **entry.get("labels", {})},
                },
                "spec": {"taints": entry.get("taints", [])},
                "status": {
                    "capacity": capacity,
                    "allocatable": entry.get("allocatable", capacity),
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
    return nodes


def pod(name, node, resources=None, ns="labfleet", phase="Running", init=None, limits_only=False):
    res = {k: str(v) for k, v in (resources or {}).items()}
    container = {"name": "c", "resources": {"limits": res} if limits_only else {"requests": res}}
    spec = {"nodeName": node, "containers": [container]}
    if init:
        spec["initContainers"] = [
            {"name": "i", "resources": {"requests": {k: str(v) for k, v in init.items()}}}
        ]
    return {"metadata": {"namespace": ns, "name": name}, "spec": spec, "status": {"phase": phase}}


GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-1g.10gb"
U55C = "amd.com/xilinx_u55c_gen3x16_xdma_base_3-0"


def test_empty_fleet_totals():
    got = compute_availability(fleet_nodes(), [], CATALOGUE, ["users"])
    assert got == {
        "t4": (8, 8),
        "rtx5000": (5, 5),
        "a30": (1, 1),
        "a100": (4, 4),
        "mig-1g.10gb": (7, 7),
        "u55c": (2, 2),
        "v70": (1, 1),
    }


def test_pods_in_all_namespaces_count_terminated_do_not():
    pods = [
        pod("nb-1", "gpu-t4-01", {GPU: 2, "cpu": 4}),
        pod("train-1", "gpu-t4-01", {GPU: 3}, ns="labfleet-ml"),  # a batch job elsewhere
        pod("done", "gpu-t4-01", {GPU: 3}, ns="labfleet-ml", phase="Succeeded"),
        pod("failed", "gpu-a100-01", {GPU: 4}, phase="Failed"),
        pod("pending", "", {GPU: 4}),  # not bound: holds nothing yet
        pod("a100", "gpu-a100-01", {GPU: 1}, limits_only=True),  # request defaults to limit
        pod("mig", "gpu-a100-mig-01", {MIG: 2}),
        pod("fpga", "fpga-u55c-01", {U55C: 2}),
        pod("init", "gpu-rtx5000-01", {GPU: 1}, init={GPU: 3}),  # max(sum, init) = 3
    ]
    got = compute_availability(fleet_nodes(), pods, CATALOGUE, ["users"])
    assert got["t4"] == (3, 8)
    assert got["a100"] == (3, 4)
    assert got["mig-1g.10gb"] == (5, 7)
    assert got["u55c"] == (0, 2)
    assert got["rtx5000"] == (2, 5)
    assert got["a30"] == (1, 1) and got["v70"] == (1, 1)


def test_reserved_and_virtual_nodes():
    nodes = fleet_nodes()
    # a second T4 node reserved to cms, and a virtual node claiming T4s
    nodes.append(
        {
            "metadata": {
                "name": "gpu-t4-cms",
                "labels": {"nvidia.com/gpu.product": "Tesla-T4", "reserved": "cms"},
            },
            "spec": {
                "taints": [
                    {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                    {"key": "reserved", "value": "cms", "effect": "NoSchedule"},
                ]
            },
            "status": {"allocatable": {GPU: "4"}},
        }
    )
    nodes.append(
        {
            "metadata": {
                "name": "vk",
                "labels": {"nvidia.com/gpu.product": "Tesla-T4", "type": "virtual-kubelet"},
            },
            "status": {"allocatable": {GPU: "100"}},
        }
    )
    pods = [pod("cms-job", "gpu-t4-cms", {GPU: 1}, ns="labfleet-cms")]
    assert compute_availability(nodes, pods, CATALOGUE, ["users", "ml"])["t4"] == (8, 8)
    assert compute_availability(nodes, pods, CATALOGUE, ["users", "cms"])["t4"] == (11, 12)


def test_cordoned_and_not_ready_nodes_left_out():
    nodes = fleet_nodes()
    for node in nodes:
        if node["metadata"]["name"] == "gpu-t4-01":
            node["spec"]["unschedulable"] = True
        if node["metadata"]["name"] == "gpu-a30-01":
            node["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    got = compute_availability(nodes, [], CATALOGUE, [])
    assert got["t4"] == (0, 0) and got["a30"] == (0, 0) and got["a100"] == (4, 4)


def test_overcommitted_node_never_negative():
    pods = [pod("x", "gpu-a30-01", {GPU: 1}), pod("y", "gpu-a30-01", {GPU: 1}, ns="other")]
    assert compute_availability(fleet_nodes(), pods, CATALOGUE, [])["a30"] == (0, 1)


def test_pod_usage_ignores_cpu_memory():
    node, usage = pod_usage(pod("p", "n", {"cpu": 4, "memory": "1Gi", GPU: 1}))
    assert node == "n" and usage == {GPU: 1}
    assert pod_usage(pod("p", "n", {"cpu": 4})) == ("n", {})


def test_node_info_from_object():
    info = NodeInfo.from_object(
        {
            "metadata": {"name": "n", "labels": {"a": "b"}},
            "spec": {"taints": [{"key": "reserved", "value": "cms", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"cpu": "8", GPU: "2", "memory": "1Gi"}},
        }
    )
    assert info.allocatable == {GPU: 2}
    assert info.reserved_for == {"cms"}
    assert info.usable_by(frozenset({"cms"})) and not info.usable_by(frozenset({"ml"}))


def test_index_incremental_events_match_full_recompute():
    nodes = fleet_nodes()
    index = AvailabilityIndex()
    index.replace_nodes(nodes)
    index.replace_pods([])
    a = pod("a", "gpu-t4-01", {GPU: 2})
    b = pod("b", "gpu-t4-01", {GPU: 1}, ns="labfleet-ml")
    index.pod_event("ADDED", a)
    index.pod_event("ADDED", b)
    assert index.availability(CATALOGUE, [])["t4"] == (5, 8)
    # memoised answer is a copy: callers cannot corrupt it
    index.availability(CATALOGUE, [])["t4"] = (0, 0)
    assert index.availability(CATALOGUE, [])["t4"] == (5, 8)
    index.pod_event("MODIFIED", {**a, "status": {"phase": "Succeeded"}})
    assert index.availability(CATALOGUE, [])["t4"] == (7, 8)
    index.pod_event("DELETED", b)
    assert index.availability(CATALOGUE, [])["t4"] == (8, 8)
    index.node_event("DELETED", nodes[3])  # gpu-t4-01
    assert index.availability(CATALOGUE, [])["t4"] == (0, 0)
    index.node_event("ADDED", nodes[3])
    assert index.availability(CATALOGUE, []) == compute_availability(nodes, [], CATALOGUE, [])


# -- the watch loop with a fake API -----------------------------------------------------


class FakeResponse:
    def __init__(self, body, status=200):
        self.body = json.dumps(body).encode()
        self.status = status

    async def read(self):
        return self.body


class FakeApi:
    """list_node / list_pod_for_all_namespaces: a list, then events from a queue."""

    def __init__(self, nodes, pods):
        self.items = {"list_node": nodes, "list_pod_for_all_namespaces": pods}
        self.events = {k: asyncio.Queue() for k in self.items}
        self.calls = []
        self.refuse: dict[str, str] = {}  # method -> message of a 403 answer

    def __getattr__(self, name):
        if name not in self.items:
            raise AttributeError(name)

        async def method(**kwargs):
            self.calls.append((name, kwargs))
            if name in self.refuse:
                status = {"kind": "Status", "code": 403, "message": self.refuse[name]}
                return FakeResponse(status, status=403)
            return FakeResponse({"items": self.items[name], "metadata": {"resourceVersion": "1"}})

        method.api_name = name
        return method


class FakeWatch:
    def __init__(self, api):
        self.api = api

    def stream(self, method, **kwargs):
        name = method.func.api_name
        self.api.calls.append((name + ":watch", kwargs))
        self.queue = self.api.events[name]
        return self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def __aiter__(self):
        return self

    async def __anext__(self):
        event = await self.queue.get()
        if event is None:
            raise StopAsyncIteration
        if isinstance(event, Exception):  # the connection breaks
            raise event
        return event


async def test_cluster_watch_lists_once_then_follows_events():
    api = FakeApi(fleet_nodes(), [pod("a", "gpu-a30-01", {GPU: 1})])
    watch = ClusterWatch(api, watch_factory=lambda: FakeWatch(api))
    watch.start()
    try:
        assert await watch.wait_ready(5)
        assert watch.index.availability(CATALOGUE, [])["a30"] == (0, 1)
        lists = [c for c in api.calls if not c[0].endswith(":watch")]
        assert sorted(c[0] for c in lists) == ["list_node", "list_pod_for_all_namespaces"]
        pods_list = next(c for c in lists if c[0] == "list_pod_for_all_namespaces")
        assert "status.phase!=Succeeded" in pods_list[1]["field_selector"]

        event = {"type": "DELETED", "raw_object": pod("a", "gpu-a30-01", {GPU: 1})}
        event["raw_object"]["metadata"]["resourceVersion"] = "7"
        await api.events["list_pod_for_all_namespaces"].put(event)
        for _ in range(50):
            if watch.index.availability(CATALOGUE, [])["a30"] == (1, 1):
                break
            await asyncio.sleep(0.01)
        assert watch.index.availability(CATALOGUE, [])["a30"] == (1, 1)

        calls_before = len(api.calls)
        for _ in range(100):  # form renders: no API call
            watch.index.availability(CATALOGUE, ["ml"])
        assert len(api.calls) == calls_before

        # a watch that ends resumes from the last resourceVersion, without a new list
        await api.events["list_pod_for_all_namespaces"].put(None)
        for _ in range(50):
            watches = [c for c in api.calls if c[0] == "list_pod_for_all_namespaces:watch"]
            if len(watches) == 2:
                break
            await asyncio.sleep(0.01)
        assert watches[-1][1]["resource_version"] == "7"
        assert len([c for c in api.calls if c[0] == "list_pod_for_all_namespaces"]) == 1
    finally:
        await watch.stop()


async def test_cluster_watch_relists_after_error():
    api = FakeApi(fleet_nodes(), [])

    class Broken(FakeWatch):
        async def __anext__(self):
            raise RuntimeError("connection reset")

    watch = ClusterWatch(api, watch_factory=lambda: Broken(api))
    watch.start()
    try:
        assert await watch.wait_ready(5)
        for _ in range(100):
            if len([c for c in api.calls if c[0] == "list_node"]) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len([c for c in api.calls if c[0] == "list_node"]) >= 2
    finally:
        await watch.stop()


async def test_a_refused_list_keeps_the_index_and_says_why(caplog):
    """Without preloading the client does not raise on HTTP errors; a 403 Status body
    must neither empty the index nor be read as a list."""
    api = FakeApi(fleet_nodes(), [pod("a", "gpu-a30-01", {GPU: 1})])
    watch = ClusterWatch(api, watch_factory=lambda: FakeWatch(api))
    watch.start()
    try:
        assert await watch.wait_ready(5)
        before = watch.index.availability(CATALOGUE, [])
        assert before["a30"] == (0, 1)
        # RBAC changes under the hub, then the pod watch breaks and the loop relists
        api.refuse["list_pod_for_all_namespaces"] = 'pods is forbidden: User "hub"'
        await api.events["list_pod_for_all_namespaces"].put(RuntimeError("connection reset"))
        for _ in range(100):
            if "HTTP 403" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "listing pods answered HTTP 403: pods is forbidden" in caplog.text
        # the last good view stands; nothing was replaced by the error body
        assert watch.index.availability(CATALOGUE, []) == before
    finally:
        await watch.stop()


@pytest.mark.parametrize("timeout", [0.05])
async def test_wait_ready_times_out(timeout):
    class Never:
        def __getattr__(self, name):
            async def method(**kwargs):
                await asyncio.sleep(3600)

            return method

    watch = ClusterWatch(Never())
    watch.start()
    try:
        assert await watch.wait_ready(timeout) is False
        assert not watch.ready
    finally:
        await watch.stop()
