"""The accounting service's RBAC (``labfleet_accounting.rbac``) on the real API server.

A fresh ServiceAccount gets only the ClusterRole and binding the builder
makes; everything the service does here goes through a kubeconfig holding
nothing but that account's token (``kubectl create token``). With it:

- the real ``labfleet-accounting serve --AccountingApp.kubernetes=True``
  process lists and watches pods and records a session's start and stop;
- the QuotaManager, over the service's own client factory
  (``labfleet_hub.kubeclient.api_client``), patches a group's ClusterQueue
  in place;
- everything else is refused with 403 naming the account and the verb:
  another tenant's ClusterQueue, creating/replacing/deleting ClusterQueues,
  writing or reading single pods, secrets, Kueue Workloads. Each refused
  request is then made with the admin identity as a server-side dry run,
  which must succeed: the refusal is RBAC's, not a malformed request's.

Pods, queues and the collector harness are the other accounting k8s tests'
(imported, not copied).
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from k8s_helpers import clusterlib, service_account_view, wait_for
from labfleet_accounting.quotas import KUEUE, Cap, Change, QuotaManager
from labfleet_accounting.rbac import accounting_rbac_objects
from labfleet_batch.kube import KubeAPI, KubeError
from labfleet_hub.kubeclient import api_client
from test_accounting_collector import SHORT, Service, fleet, ledger  # noqa: F401 (fixtures)
from test_accounting_quota import GPU, active, cq, queues, quota_of  # noqa: F401 (fixture)

#: The bundled configuration's ClusterQueues, as in accounting/manifests/rbac.yaml.
BUNDLED_QUEUES = ["labfleet-cms", "labfleet-ml"]
SERVICE_ACCOUNT = "labfleet-accounting"


@pytest.fixture
def db_url(tmp_path):
    """SQLite only: the rights do not depend on the ledger database (the fixtures' ``db_url``)."""
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@dataclasses.dataclass
class Grant:
    cluster: clusterlib.Cluster  # the test cluster as the account sees it (its token only)
    user: str  # the API server's name for the account


@pytest.fixture
def grant(k8s_cluster, tmp_path):
    """Factory: a ServiceAccount with the builder's RBAC for the given ClusterQueues."""
    made: list[tuple[str, str]] = []

    def make(cluster_queues: list[str]) -> Grant:
        s = uuid.uuid4().hex[:6]
        ns, role = f"acct-{s}", f"labfleet-accounting-{s}"  # cluster-scoped: unique name
        k8s_cluster.kubectl("create", "namespace", ns)
        made.append((ns, role))
        k8s_cluster.kubectl("create", "serviceaccount", SERVICE_ACCOUNT, "-n", ns)
        k8s_cluster.apply(accounting_rbac_objects(SERVICE_ACCOUNT, ns, cluster_queues, name=role))
        view = service_account_view(
            k8s_cluster,
            ns,
            SERVICE_ACCOUNT,
            tmp_path / f"{role}.kubeconfig",
            *("watch", "pods", "--all-namespaces"),
        )
        return Grant(view, f"system:serviceaccount:{ns}:{SERVICE_ACCOUNT}")

    yield make
    for ns, role in made:
        k8s_cluster.kubectl("delete", "clusterrolebinding,clusterrole", role, check=False)
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def test_collector_records_a_session_with_only_its_rights(
    grant,
    fleet,  # noqa: F811 (the fixture imported above)
    ledger,  # noqa: F811
    db_url,
    tmp_path,
):
    sa = grant(BUNDLED_QUEUES)
    log = tmp_path / "service.log"
    service = Service(sa.cluster, db_url, log)  # KUBECONFIG: the account's token only
    await service.start()
    try:
        await fleet.listed(ledger, service)  # its first list, cluster-wide
        await fleet.start_session(SHORT)  # pods are the admin's, as the spawner's would be
        await fleet.agrees(ledger, service)  # the start, from the watch
        await fleet.delete(SHORT)
        await fleet.agrees(ledger, service)  # the stop, within TOLERANCE of the deletion
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        await service.stop()
    rows = [r for r in ledger.intervals("k8s") if r["uid"] in fleet.truth]
    assert len(rows) == 1 and rows[0]["name"] == SHORT.name and rows[0]["end_s"] is not None
    text = log.read_text(errors="replace")
    # one list then one uninterrupted watch: no refused request made it resync
    assert service.resyncs() == 1 and "Pod watch failed" not in text, text[-3000:]


def bare_pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}  # fmt: skip


def foreign_queue(name: str, flavor: str, cpu: str = "1") -> dict:
    """Another tenant's ClusterQueue: not in the account's resourceNames."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "resourceGroups": [{"coveredResources": ["cpu"], "flavors": [
                {"name": flavor, "resources": [{"name": "cpu", "nominalQuota": cpu}]}]}],
        },
    }  # fmt: skip


async def test_quota_patch_in_place_and_everything_else_refused(
    k8s_cluster,
    k8s_namespace,
    queues,  # noqa: F811 (the fixture imported above)
    grant,
):
    admin, config, admin_manager = queues
    t4, ml = config.flavor("t4"), config.cluster_queue("ml")
    sa = grant([config.cluster_queue(g) for g in config.groups])
    client = await api_client(str(sa.cluster.kubeconfig))  # the service's client factory
    tenant = f"tenant{uuid.uuid4().hex[:6]}"
    try:
        kube = KubeAPI(client)
        # -- allowed: a group admin's change reaches the group's queue, in place
        before = wait_for("ClusterQueue active", lambda: (o := cq(k8s_cluster, config))
                          and active(o) and o, timeout=60)  # fmt: skip
        manager = QuotaManager(kube, admin_manager.engine, config.cluster_queue)
        manager.set_caps("root", "ml", [Cap(t4, GPU, "4", "2")])
        result = await manager.set("alice", "ml", [Change(t4, GPU, "3", "2")])
        after = cq(k8s_cluster, config)
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
        assert quota_of(after, t4, GPU) == {"name": GPU, "nominalQuota": "3", "borrowingLimit": "2"}
        assert result["cluster_queue"] == ml
        assert (await manager.get("cms"))["cluster_queue"] == config.cluster_queue("cms")

        # -- refused: what a compromised service might try
        ns, flavor = k8s_namespace, config.default_flavor()
        k8s_cluster.apply(foreign_queue(tenant, flavor))
        k8s_cluster.apply({**bare_pod("victim"), "metadata": {"name": "victim", "namespace": ns}})
        k8s_cluster.kubectl("create", "secret", "generic", "victim", "-n", ns, "--from-literal=k=v")
        tenant_before = unchanging(k8s_cluster.kubectl_json("get", "clusterqueue", tenant))
        pod_before = k8s_cluster.kubectl_json("get", "pod", "victim", "-n", ns)
        replace_ml = cq(k8s_cluster, config)  # the whole object, for PUT (update)
        raise_quota = {"spec": foreign_queue(tenant, flavor, cpu="999")["spec"]}
        cqs, pods = f"{KUEUE}/clusterqueues", f"/api/v1/namespaces/{ns}/pods"
        # (verb, resource) as RBAC names them, and the request
        probes = [
            ("patch", "clusterqueues", "PATCH", f"{cqs}/{tenant}", raise_quota),
            ("get", "clusterqueues", "GET", f"{cqs}/{tenant}", None),
            ("delete", "clusterqueues", "DELETE", f"{cqs}/{tenant}", None),
            ("delete", "clusterqueues", "DELETE", f"{cqs}/{ml}", None),
            ("update", "clusterqueues", "PUT", f"{cqs}/{ml}", replace_ml),
            ("create", "clusterqueues", "POST", cqs, foreign_queue(f"{tenant}-new", flavor)),
            ("list", "clusterqueues", "GET", cqs, None),
            ("create", "pods", "POST", pods, bare_pod("intruder")),
            ("delete", "pods", "DELETE", f"{pods}/victim", None),
            ("deletecollection", "pods", "DELETE", pods, None),
            ("patch", "pods", "PATCH", f"{pods}/victim", {"metadata": {"labels": {"x": "y"}}}),
            ("get", "pods", "GET", f"{pods}/victim", None),
            ("get", "secrets", "GET", f"/api/v1/namespaces/{ns}/secrets/victim", None),
            ("list", "secrets", "GET", f"/api/v1/namespaces/{ns}/secrets", None),
            ("list", "secrets", "GET", "/api/v1/secrets", None),
            ("list", "workloads", "GET", f"{KUEUE}/workloads", None),
        ]
        refused, wrong = 0, []
        for verb, resource, method, path, body in probes:
            try:
                await kube.request(method, path, body=body, content_type=_content_type(method))
            except KubeError as e:
                reason = f'User "{sa.user}" cannot {verb} resource "{resource}"'
                if e.status == 403 and reason in e.message:
                    refused += 1
                    continue
                wrong.append(f"{method} {path}: {e}")
            else:
                wrong.append(f"{method} {path}: allowed")
        assert (len(probes), refused, wrong) == (16, 16, [])
        # nothing changed behind the refusals
        assert unchanging(k8s_cluster.kubectl_json("get", "clusterqueue", tenant)) == tenant_before
        assert unchanging(cq(k8s_cluster, config)) == unchanging(replace_ml)
        pod_now = k8s_cluster.kubectl_json("get", "pod", "victim", "-n", ns)
        assert pod_now["metadata"]["uid"] == pod_before["metadata"]["uid"]
        assert "x" not in (pod_now["metadata"].get("labels") or {})

        # the same requests as the admin (writes as server-side dry runs) go through
        accepted = 0
        for _, _, method, path, body in probes:
            query = None if method == "GET" else {"dryRun": "All"}
            if method == "PUT":  # Kueue may have written the status since: the current version
                body = cq(k8s_cluster, config)
            await admin.request(method, path, body=body, query=query,
                                content_type=_content_type(method))  # fmt: skip
            accepted += 1
        assert accepted == len(probes)
        assert unchanging(k8s_cluster.kubectl_json("get", "clusterqueue", tenant)) == tenant_before
    finally:
        await client.close()
        k8s_cluster.kubectl("delete", "clusterqueue", tenant, "--wait=false", check=False)


def unchanging(queue: dict) -> tuple:
    """What only a writer changes (Kueue keeps writing the status, and so the version)."""
    meta = queue["metadata"]
    return meta["uid"], meta["generation"], queue["spec"]


def _content_type(method: str) -> str:
    return "application/merge-patch+json" if method == "PATCH" else "application/json"
