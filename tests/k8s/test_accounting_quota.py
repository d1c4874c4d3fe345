"""Group quota management against the real control plane and Kueue.

The queue layout (namespaces, ResourceFlavors, per-group ClusterQueues) is
created by ``labfleet_batch.queues.sync_queues``, as in production; the
accounting service's QuotaManager patches the ClusterQueues in place.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from jupyterhub.services.auth import HubOAuth
from k8s_helpers import delete_queue_layout, wait_for
from kubernetes_asyncio import client as k8s
from labfleet_accounting import db
from labfleet_accounting.budgets import BudgetChecker
from labfleet_accounting.quotas import Cap, Change, OverCap, QuotaError, QuotaManager
from labfleet_accounting.reports import Weights
from labfleet_accounting.service import Context, make_app
from labfleet_batch.kube import KubeAPI
from labfleet_batch.queues import parse_queue_config, sync_queues
from labfleet_spawner.catalogue import load_catalogue
from prometheus_client import CollectorRegistry

from tests.accounting.test_service_authz import SCOPE, USERS, fake_hub  # noqa: F401
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
GPU = "nvidia.com/gpu"


def api_client(cluster) -> k8s.ApiClient:
    conf = k8s.Configuration(host=cluster.server)
    conf.api_key = {"BearerToken": f"Bearer {cluster.token}"}
    conf.ssl_ca_cert = str(cluster.ca_file)
    return k8s.ApiClient(conf)


@pytest.fixture
async def queues(k8s_cluster, tmp_path):
    """Groups ml and cms with their ClusterQueues; yields (kube, config, manager)."""
    s = uuid.uuid4().hex[:5]
    config = parse_queue_config(
        {
            "name_prefix": f"lfq{s}-",
            "namespace_prefix": f"lfq{s}-",
            "cohort": f"coq{s}",
            "groups": {
                "ml": {"cpu": 8, "memory": "32Gi", "accelerators": {"t4": 2},
                       "borrowing_limit": {GPU: 1}},
                "cms": {"cpu": 4, "memory": "16Gi"},
            },
        },
        CATALOGUE,
    )  # fmt: skip
    api = api_client(k8s_cluster)
    kube = KubeAPI(api)
    await sync_queues(kube, config, CATALOGUE)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    db.upgrade(engine)
    manager = QuotaManager(kube, engine, config.cluster_queue)
    try:
        yield kube, config, manager
    finally:
        delete_queue_layout(k8s_cluster, config, CATALOGUE)
        await api.close()
        engine.dispose()


def cq(cluster, config, group="ml") -> dict:
    return cluster.kubectl_json("get", "clusterqueue", config.cluster_queue(group), "-o", "json")


def quota_of(obj: dict, flavor: str, resource: str) -> dict:
    for rg in obj["spec"]["resourceGroups"]:
        for f in rg["flavors"]:
            for r in f["resources"]:
                if f["name"] == flavor and r["name"] == resource:
                    return r
    raise KeyError((flavor, resource))


def active(obj: dict) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Active" and c["status"] == "True" for c in conditions)


async def test_quota_is_patched_in_place_within_caps_and_audited(k8s_cluster, queues):
    kube, config, manager = queues
    t4, default = config.flavor("t4"), config.default_flavor()
    before = wait_for("ClusterQueue active", lambda: (o := cq(k8s_cluster, config)) and active(o)
                      and o, timeout=60)  # fmt: skip
    manager.set_caps("root", "ml", [Cap(t4, GPU, "4", "2"), Cap(default, "cpu", "16", "0")])

    changes = [Change(t4, GPU, "3", "2"), Change(default, "cpu", "12")]
    result = await manager.set("alice", "ml", changes)
    after = cq(k8s_cluster, config)
    # the same object, changed in place: never deleted and recreated
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["creationTimestamp"] == before["metadata"]["creationTimestamp"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert quota_of(after, t4, GPU) == {"name": GPU, "nominalQuota": "3", "borrowingLimit": "2"}
    assert str(quota_of(after, default, "cpu")["nominalQuota"]) == "12"
    assert quota_of(after, default, "memory")["nominalQuota"] == "32Gi"  # untouched
    assert after["spec"]["cohortName"] == before["spec"]["cohortName"]
    assert after["spec"]["namespaceSelector"] == before["spec"]["namespaceSelector"]
    assert {(q["flavor"], q["resource"]): q["nominalQuota"] for q in result["quotas"]}[
        (t4, GPU)
    ] == "3"
    # Kueue took it: still active, and its status shows no error
    wait_for("ClusterQueue active after the patch", lambda: active(cq(k8s_cluster, config)))

    # above a cap, uncapped, unknown: refused, and the queue is not touched
    version = cq(k8s_cluster, config)["metadata"]["resourceVersion"]
    with pytest.raises(OverCap, match="exceeds the cap 4"):
        await manager.set("alice", "ml", [Change(t4, GPU, "5")])
    with pytest.raises(OverCap, match="exceeds the cap 2"):
        await manager.set("alice", "ml", [Change(t4, GPU, None, "3")])
    with pytest.raises(OverCap, match="no cap for memory"):
        await manager.set("alice", "ml", [Change(default, "memory", "1Gi")])
    manager.set_caps("root", "ml", [Cap(t4, GPU, "4", "2"), Cap("nope", GPU, "4", "2")])
    with pytest.raises(QuotaError, match="has no nvidia.com/gpu on flavor 'nope'"):
        await manager.set("alice", "ml", [Change("nope", GPU, "1")])
    assert cq(k8s_cluster, config)["metadata"]["resourceVersion"] == version

    # who, what, when, old -> new
    entries = manager.audit("ml")
    assert [e["action"] for e in entries] == ["quota_cap.set", "quota.set", "quota_cap.set"]
    change = entries[1]
    assert change["actor"] == "alice" and change["cluster_queue"] == config.cluster_queue("ml")
    old = {(q["flavor"], q["resource"]): q for q in change["before"]}
    new = {(q["flavor"], q["resource"]): q for q in change["after"]}
    assert (old[(t4, GPU)]["nominalQuota"], new[(t4, GPU)]["nominalQuota"]) == ("2", "3")
    assert (old[(t4, GPU)]["borrowingLimit"], new[(t4, GPU)]["borrowingLimit"]) == ("1", "2")
    assert change["at"] > 0


class InterleavedWriter:
    """Between the manager's read and its patch, another writer changes the queue once."""

    def __init__(self, kube, cluster, name):
        self.kube, self.cluster, self.name = kube, cluster, name
        self.done = False
        self.calls = []

    async def request(self, method, path, **kwargs):
        try:
            result = await self.kube.request(method, path, **kwargs)
        except Exception as e:
            self.calls.append((method, getattr(e, "status", None)))
            raise
        self.calls.append((method, 200))
        if method == "GET" and not self.done:
            self.done = True
            self.cluster.kubectl(
                "patch", "clusterqueue", self.name, "--type=merge",
                "-p", json.dumps({"spec": {"stopPolicy": "None",
                                           "queueingStrategy": "StrictFIFO"}}),
            )  # fmt: skip
        return result


async def test_concurrent_change_is_not_lost(k8s_cluster, queues):
    kube, config, manager = queues
    t4 = config.flavor("t4")
    manager.set_caps("root", "ml", [Cap(t4, GPU, "4", "2")])
    manager.kube = InterleavedWriter(kube, k8s_cluster, config.cluster_queue("ml"))
    await manager.set("alice", "ml", [Change(t4, GPU, "4")])
    after = cq(k8s_cluster, config)
    # the stale write was refused (409) and retried on a fresh read: both changes stand
    assert after["spec"]["queueingStrategy"] == "StrictFIFO"
    assert quota_of(after, t4, GPU)["nominalQuota"] == "4"
    assert manager.kube.calls[:4] == [("GET", 200), ("PATCH", 409), ("GET", 200), ("PATCH", 200)]


@pytest.fixture
async def quota_service(fake_hub, queues, tmp_path):  # noqa: F811
    kube, config, manager = queues
    hub_auth = HubOAuth(api_url=fake_hub, api_token="service-token", access_scopes={SCOPE},
                        cache_max_age=0, base_url="/services/accounting/",
                        hub_prefix="/hub/", login_url="/hub/login")  # fmt: skip
    engine = manager.engine
    context = Context(engine, Weights(), "{group}-admins", {}, BudgetChecker(engine),
                      CollectorRegistry(), quotas=manager)  # fmt: skip
    app = make_app(context, hub_auth, "/services/accounting/")
    port = free_port()
    server = app.listen(port, "127.0.0.1")
    manager.set_caps("root", "ml", [Cap(config.flavor("t4"), GPU, "4", "2")])
    manager.set_caps("root", "cms", [Cap(config.default_flavor(), "cpu", "8", "0")])
    yield f"http://127.0.0.1:{port}/services/accounting/", config
    server.stop()


async def test_quota_authorization_matrix(k8s_cluster, quota_service):
    url, config = quota_service
    t4 = config.flavor("t4")
    gpu_body = json.dumps({"quotas": [{"flavor": t4, "resource": GPU, "nominalQuota": "3"}]})
    caps_body = json.dumps({"caps": [{"flavor": t4, "resource": GPU, "max_nominal": "4",
                                      "max_borrowing": "2"}]})  # fmt: skip
    cpu_body = json.dumps(
        {"quotas": [{"flavor": config.default_flavor(), "resource": "cpu", "nominalQuota": "6"}]}
    )
    # (method, path, body) -> who gets 200; everyone else with a token gets 403
    matrix = {
        ("GET", "api/quotas/ml", None): {"root", "alice"},
        ("PUT", "api/quotas/ml", gpu_body): {"root", "alice"},
        ("GET", "api/quota-caps/ml", None): {"root", "alice"},
        ("PUT", "api/quota-caps/ml", caps_body): {"root"},
        ("GET", "api/audit?group=ml", None): {"root", "alice"},
        ("GET", "api/audit", None): {"root"},
        # the page: read only for the group's other members (issue 16)
        ("GET", "quotas?group=ml", None): {"root", "alice", "eve"},
        ("GET", "api/quotas/cms", None): {"root"},
        ("PUT", "api/quotas/cms", cpu_body): {"root"},
        ("GET", "quotas?group=cms", None): {"root", "bob"},
    }
    probes = refusals = 0
    async with httpx.AsyncClient(follow_redirects=False, timeout=30) as client:
        for (method, path, body), allowed in matrix.items():
            for token, model in USERS.items():
                r = await client.request(method, url + path, content=body,
                                         headers={"Authorization": f"token {token}"})  # fmt: skip
                probes += 1
                expected = 200 if model["name"] in allowed else 403
                assert r.status_code == expected, f"{model['name']} {method} {path}: {r.text}"
                refusals += expected == 403
            r = await client.request(method, url + path, content=body)  # anonymous
            probes += 1
            refusals += 1
            assert r.status_code in (302, 403), f"anonymous {method} {path}"
        assert (probes, refusals) == (60, 60 - sum(len(a) for a in matrix.values()))

        # a group admin above the cap is refused with the reason; malformed bodies are 400
        alice = {"Authorization": "token alice-token"}
        over = json.dumps({"quotas": [{"flavor": t4, "resource": GPU, "nominalQuota": "9"}]})
        r = await client.put(url + "api/quotas/ml", content=over, headers=alice)
        assert (
            r.status_code == 400
            and "quotas[0].nominalQuota: 9 of" in r.json()["message"]
            and "exceeds the cap 4" in r.json()["message"]
        )
        r = await client.put(url + "api/quotas/ml", content=b'{"quotas": 3}', headers=alice)
        assert r.status_code == 400
        r = await client.put(
            url + "api/quotas/ml",
            content=json.dumps(
                {"quotas": [{"flavor": t4, "resource": GPU, "nominalQuota": "lots"}]}
            ),
            headers=alice,
        )
        assert r.status_code == 400 and "not a quantity" in r.json()["message"]
        # the page's form (token-authenticated POST: no XSRF cookie involved)
        page = await client.get(url + "quotas?group=ml", headers=alice)
        # in the hub's layout (its scripts); the form itself needs none
        assert "Batch quotas of ml" in page.text and 'type="submit"' in page.text
        index = next(i for i in range(10) if f'name="nominal-{i}" value="3"' in page.text)
        r = await client.post(
            url + "quotas?group=ml",
            headers=alice,
            data={f"nominal-{index}": "4", f"borrowing-{index}": "2"},
        )
        assert r.status_code == 200 and "Saved 1 change(s)." in r.text, r.text
    assert quota_of(cq(k8s_cluster, config), t4, GPU)["nominalQuota"] == "4"
