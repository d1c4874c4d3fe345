"""KubeBackend logic against a fake API (no network): queue position sources, RBAC scope."""

from __future__ import annotations

from pathlib import Path

import yaml
from labfleet_batch.kube import (
    KubeBackend,
    KubeError,
    object_path,
    queue_info,
    usage_from_local_queue,
)
from labfleet_batch.queues import parse_queue_config
from labfleet_batch.rbac import rbac_objects
from labfleet_spawner.catalogue import load_catalogue

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
CONFIG = parse_queue_config({"groups": {"ml": {"cpu": 1, "memory": "1Gi"}}}, CATALOGUE)


def workload(name, priority=0, created="2025-01-01T00:00:00Z", reserved=False):
    conds = [{"type": "QuotaReserved", "status": "True" if reserved else "False"}]
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"queueName": "ml-queue", "priority": priority},
        "status": {"conditions": conds},
    }


JOB = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "ml-queue"}, "uid": "u"}}


class FakeAPI:
    def __init__(self, served: dict[str, list]):
        self.served = served  # visibility version -> pending items
        self.calls = []

    async def request(self, method, path, **kw):
        self.calls.append(path)
        for version, items in self.served.items():
            if f"/{version}/" in path:
                return {"items": items}
        raise KubeError(404, "the server could not find the requested resource")


async def test_position_prefers_visibility_v1beta2_then_v1beta1():
    pending = [{"metadata": {"name": "w2"}, "positionInLocalQueue": 3}]
    api = FakeAPI({"v1beta1": pending})
    backend = KubeBackend(api, CONFIG)
    pos = await backend.position("labfleet-ml", JOB, workload("w2"), [])
    assert pos == {"position": 4, "position_source": "visibility/v1beta1"}
    assert "v1beta2" in api.calls[0] and "v1beta1" in api.calls[1]
    api = FakeAPI({"v1beta2": pending, "v1beta1": []})
    pos = await KubeBackend(api, CONFIG).position("labfleet-ml", JOB, workload("w2"), [])
    assert pos["position_source"] == "visibility/v1beta2"


async def test_position_estimate_orders_by_priority_then_age_and_probes_once():
    api = FakeAPI({})
    backend = KubeBackend(api, CONFIG)
    wls = [
        workload("old-low", 100, "2025-01-01T00:00:00Z"),
        workload("new-high", 1000, "2025-01-02T00:00:00Z"),
        workload("mine", 100, "2025-01-03T00:00:00Z"),
        workload("running", 100, "2024-01-01T00:00:00Z", reserved=True),
    ]
    pos = await backend.position("labfleet-ml", JOB, wls[2], wls)
    assert pos == {"position": 3, "position_source": "estimate", "pending_in_queue": 3}
    probes = len(api.calls)
    await backend.position("labfleet-ml", JOB, wls[2], wls)
    assert len(api.calls) == probes  # not served: not asked again within visibility_retry


def test_queue_info_reports_pending_reason_and_preemption():
    wl = {
        "metadata": {"name": "w"},
        "status": {
            "conditions": [
                {
                    "type": "QuotaReserved",
                    "status": "False",
                    "reason": "Pending",
                    "message": "couldn't assign flavors: insufficient quota",
                },
            ]
        },
    }
    info = queue_info(wl)
    assert info["admitted"] is False and "insufficient quota" in info["message"]
    wl["status"]["conditions"].append(
        {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "by w2"}
    )
    assert queue_info(wl)["reason"] == "Preempted"
    assert queue_info(None)["reason"] == "NoWorkload"


def test_object_paths():
    assert object_path({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}) == (
        "/api/v1/namespaces/a"
    )
    lq = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": "q", "namespace": "n"},
    }
    assert object_path(lq) == "/apis/kueue.x-k8s.io/v1beta2/namespaces/n/localqueues/q"


def test_rbac_is_namespaced_only_and_manifest_is_current():
    objs = rbac_objects(CONFIG, "labfleet-batch", "labfleet")
    assert {o["kind"] for o in objs} == {"Role", "RoleBinding"}
    assert all(o["metadata"]["namespace"] == "labfleet-ml" for o in objs)
    role = next(o for o in objs if o["kind"] == "Role")
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    assert not verbs & {"*", "update", "patch", "escalate", "bind"}
    shipped = list(yaml.safe_load_all((ROOT / "batch/manifests/rbac.yaml").read_text()))
    assert all(d["kind"] in ("Role", "RoleBinding") for d in shipped)
    ml = parse_queue_config({"groups": {"ml": {}, "cms": {}}}, CATALOGUE)
    assert shipped == rbac_objects(ml, "labfleet-batch", "labfleet")


def test_usage_from_local_queue_status():
    config = parse_queue_config(
        {"groups": {"ml": {"cpu": 16, "memory": "64Gi", "accelerators": {"t4": 2, "a100": 1}}}},
        CATALOGUE,
    )
    queue = {
        "status": {
            "admittedWorkloads": 2,
            "flavorsUsage": [
                {
                    "name": config.default_flavor(),
                    "resources": [
                        {"name": "cpu", "total": "1500m"},
                        {"name": "memory", "total": "2Gi"},
                    ],
                },
                {
                    "name": config.flavor("t4"),
                    "resources": [
                        {"name": "cpu", "total": "2"},
                        {"name": "memory", "total": "8Gi"},
                        {"name": "nvidia.com/gpu", "total": "2"},
                    ],
                },
                # a flavor the group's quota does not name (another group's) counts no GPU
                {"name": "other-a30", "resources": [{"name": "nvidia.com/gpu", "total": "1"}]},
            ],
        }
    }
    assert usage_from_local_queue(queue, config, "ml") == {
        "cpu": 3.5,
        "memory": 10 * 2**30,
        "acc:t4": 2.0,
        "jobs": 2.0,
    }
    # Kueue has not counted anything yet: unknown, not zero
    assert usage_from_local_queue({"status": {}}, config, "ml") == {}
