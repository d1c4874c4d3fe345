"""Interactive GPU sessions counted against the group's Kueue quota (plain-pod integration).

Against the real control plane with Kueue's ``pod`` integration and its
webhooks on (tools/cluster): a catalogue profile with ``kueue: true`` makes
PlatformKubeSpawner create the pod with the queue label, the managed label
and the admission gate; Kueue admits it within the ClusterQueue's quota (and
removes the gate), the scheduler places it on the flavor's node; a session
beyond the quota keeps its gate, and spawn progress says where it is in the
queue (Kueue's visibility API when the cluster serves it).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest
from k8s_helpers import wait_for
from labfleet_hub import contract
from test_kube_spawner import (  # noqa: F401  (fixtures)
    CATALOGUE,
    _stop_watches,
    api_pod,
    choose,
    eventually,
    kube,
    make_spawner,
    make_user,
    namespace,
)

KUEUE = "kueue.x-k8s.io/v1beta2"
GROUP = "ml"  # the accounting group of a user in users+ml on the T4 profile


def kueue_catalogue():
    profiles = dict(CATALOGUE.profiles)
    profiles["gpu-t4"] = replace(profiles["gpu-t4"], kueue=True)
    return replace(CATALOGUE, profiles=profiles)


def quota_for_t4(c, ns: str, gpus: int) -> str:
    """A T4 flavor, a ClusterQueue of ``gpus`` T4s and the group's LocalQueue in ``ns``."""
    s = uuid.uuid4().hex[:6]
    rf, cq = f"t4-{s}", f"cq-nb-{s}"
    c.apply(
        [
            {
                "apiVersion": KUEUE,
                "kind": "ResourceFlavor",
                "metadata": {"name": rf},
                "spec": {
                    "nodeLabels": {"nvidia.com/gpu.product": "Tesla-T4"},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                },
            },
            {
                "apiVersion": KUEUE,
                "kind": "ClusterQueue",
                "metadata": {"name": cq},
                "spec": {
                    "namespaceSelector": {},
                    "queueingStrategy": "StrictFIFO",
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                            "flavors": [
                                {
                                    "name": rf,
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": 64},
                                        {"name": "memory", "nominalQuota": "256Gi"},
                                        {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
        ]
    )
    lq = contract.group_local_queue(GROUP)
    c.apply(
        {
            "apiVersion": KUEUE,
            "kind": "LocalQueue",
            "metadata": {"name": lq, "namespace": ns},
            "spec": {"clusterQueue": cq},
        }
    )

    def active(kind, *name):
        conds = c.kubectl_json("get", kind, *name).get("status", {}).get("conditions", [])
        return any(c["type"] == "Active" and c["status"] == "True" for c in conds)

    wait_for(f"ClusterQueue {cq} Active", lambda: active("clusterqueues.kueue.x-k8s.io", cq))
    wait_for(f"LocalQueue {lq} Active", lambda: active("localqueues.kueue.x-k8s.io", "-n", ns, lq))
    return cq


def workload_of_pod(c, ns: str, pod: dict) -> dict | None:
    uid = pod["metadata"]["uid"]
    for wl in c.kubectl_json("get", "workloads.kueue.x-k8s.io", "-n", ns)["items"]:
        if any(r.get("uid") == uid for r in wl["metadata"].get("ownerReferences", [])):
            return wl
    return None


def gpu_usage(c, cq: str) -> str:
    status = c.kubectl_json("get", "clusterqueues.kueue.x-k8s.io", cq).get("status", {})
    for flavor in status.get("flavorsUsage", []):
        for r in flavor["resources"]:
            if r["name"] == "nvidia.com/gpu":
                return r.get("total", "0")
    return "0"


async def told_their_places(followers: list[Progress]) -> None:
    """The second and third gated sessions' progress: next in line, then position 2."""
    await eventually(
        "second session told it is next",
        lambda: "you are next in line" in followers[0].last(),
        timeout=30,
    )
    await eventually(
        "third session told it is second in line",
        lambda: "position 2 in line (1 session or job ahead of you)" in followers[1].last(),
        timeout=30,
    )


class Progress:
    """Collects a spawner's progress messages in the background."""

    def __init__(self, spawner):
        self.spawner = spawner
        self.messages: list[str] = []
        self.task = asyncio.ensure_future(self._follow())

    async def _follow(self):
        while self.spawner._start_future is None:
            await asyncio.sleep(0.05)
        async for event in self.spawner.progress():
            self.messages.append(event["message"])

    def last(self) -> str:
        return self.messages[-1] if self.messages else ""


async def test_gpu_sessions_admitted_within_quota_and_queued_beyond_it(kube, namespace):  # noqa: F811
    if not kube.webhooks:
        pytest.skip("cluster started without Kueue webhooks (pod integration needs them)")
    cq = quota_for_t4(kube, namespace, gpus=1)
    catalogue = kueue_catalogue()
    fast = {"progress_interval": 0.2, "queue_position_interval": 0.5, "events_enabled": False}

    def spawner():
        return choose(
            make_spawner(namespace, make_user(("users", GROUP)), catalogue_data=catalogue, **fast),
            profile="gpu-t4",
        )

    first, second, third = spawner(), spawner(), spawner()
    starts: list[asyncio.Future] = []
    followers: list[Progress] = []
    try:
        # within quota: gated at creation, admitted by Kueue, scheduled on the T4 node
        url = await first.start()
        assert url.startswith("http://127.")
        pod = api_pod(kube, namespace, first.pod_name)
        labels = pod["metadata"]["labels"]
        assert labels[contract.KUEUE_QUEUE_LABEL] == contract.group_local_queue(GROUP)
        assert labels[contract.KUEUE_MANAGED_LABEL] == "true"
        assert not pod["spec"].get("schedulingGates")  # Kueue removed the gate on admission
        assert pod["spec"]["nodeName"] == "gpu-t4-01"
        wl = workload_of_pod(kube, namespace, pod)
        assert wl and wl["status"]["admission"]["clusterQueue"] == cq
        await eventually("1 GPU of quota in use", lambda: gpu_usage(kube, cq) == "1")

        # beyond quota: both stay gated; progress shows their places in the queue
        starts.append(asyncio.ensure_future(second.start()))
        followers.append(Progress(second))
        await eventually(
            "the second session's pod",
            lambda: (
                kube.kubectl("get", "pod", "-n", namespace, second.pod_name, check=False).returncode
                == 0
            ),
        )
        await asyncio.sleep(1.1)  # distinct creation seconds: an unambiguous FIFO order
        starts.append(asyncio.ensure_future(third.start()))
        followers.append(Progress(third))
        await told_their_places(followers)
        assert "queue ml-queue" in followers[1].last()
        # positions came from Kueue itself where the cluster serves the visibility API
        expected = "visibility" if kube.visibility else "workloads"
        assert second._position_source == third._position_source == expected
        for s in (second, third):
            waiting = api_pod(kube, namespace, s.pod_name)
            gates = [g["name"] for g in waiting["spec"].get("schedulingGates", [])]
            assert contract.KUEUE_ADMISSION_GATE in gates, gates
            assert not waiting["spec"].get("nodeName")
        assert not starts[0].done() and not starts[1].done()
        assert gpu_usage(kube, cq) == "1"

        # the first session ends: its quota goes to the second, the third moves up
        await first.stop(now=True)
        url = await asyncio.wait_for(starts[0], 45)
        assert url.startswith("http://127.")
        assert api_pod(kube, namespace, second.pod_name)["spec"]["nodeName"] == "gpu-t4-01"
        await eventually(
            "third session told it is next",
            lambda: "you are next in line" in followers[1].last(),
            timeout=30,
        )
        assert not starts[1].done()
    finally:
        for task in starts:
            task.cancel()
        for f in followers:
            f.task.cancel()
        await asyncio.gather(*(s.stop(now=True) for s in (first, second, third)))
