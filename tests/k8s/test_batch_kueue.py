"""The batch service with the Kubernetes backend against the real control plane and Kueue.

The service runs on loopback, authenticates users through a real JupyterHub
(HubAuth), and talks to the API server as a ServiceAccount that only has
Roles in the groups' namespaces. The queue layout comes from
``labfleet_batch.queues.sync_queues`` applied with the admin identity.

KWOK pods run no process and no kubelet serves their logs: the log endpoint is
checked only for the API server's refusal, reported as 409 with the reason.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from k8s_helpers import delete_queue_layout, wait_for
from kubernetes_asyncio import client as k8s
from labfleet_batch.kube import KubeAPI, KubeBackend, KubeError
from labfleet_batch.podspec import PodStorage
from labfleet_batch.queues import parse_queue_config, sync_queues
from labfleet_batch.rbac import rbac_objects
from labfleet_hub import contract
from labfleet_hub.posix_ids import hub_api_ids
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.storage import DEFAULT_GID_BASE, DEFAULT_UID_BASE

from tests.batch.conftest import hub  # noqa: F401  (session fixture: a real JupyterHub)
from tests.batch.harness import cross_tenant_matrix, make_context, running_service

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
SA_NAMESPACE = "labfleet-system"
# No PersistentVolume provisioner here, and the scheduler holds pods whose PVC is
# missing: the shared tree is a hostPath (as on nodes that all mount the same NFS).
STORAGE = PodStorage(volume={"hostPath": {"path": "/srv/labfleet", "type": "DirectoryOrCreate"}})


def api_client(cluster, token: str) -> k8s.ApiClient:
    conf = k8s.Configuration(host=cluster.server)
    conf.api_key = {"BearerToken": f"Bearer {token}"}
    conf.ssl_ca_cert = str(cluster.ca_file)
    return k8s.ApiClient(conf)


class Env:
    """One test's platform: unique names, queues synced, a least-privilege service."""

    def __init__(self, cluster, the_hub, groups: dict[str, dict], **extra):
        s = uuid.uuid4().hex[:5]
        self.s, self.cluster, self.hub = s, cluster, the_hub
        self.names = {g: f"{g}{s}" for g in groups}
        self.config = parse_queue_config(
            {
                "name_prefix": f"lf{s}-",
                "namespace_prefix": f"lf{s}-",
                "cohort": f"co{s}",
                "groups": {self.names[g]: q for g, q in groups.items()},
                **extra,
            },
            CATALOGUE,
        )

    def ns(self, group: str) -> str:
        return self.config.namespace(self.names[group])

    async def __aenter__(self):
        self.admin = api_client(self.cluster, self.cluster.token)
        await sync_queues(KubeAPI(self.admin), self.config, CATALOGUE)
        sa = f"batch{self.s}"
        self.cluster.kubectl("create", "namespace", SA_NAMESPACE, check=False)
        self.cluster.kubectl("create", "serviceaccount", sa, "-n", SA_NAMESPACE)
        self.cluster.apply(rbac_objects(self.config, sa, SA_NAMESPACE))
        token = self.cluster.kubectl("create", "token", sa, "-n", SA_NAMESPACE).stdout.strip()
        self.sa_client = api_client(self.cluster, token)
        # Jobs run as their owners' notebooks: ids read from the real hub (posix_ids)
        self.backend = KubeBackend(
            KubeAPI(self.sa_client),
            self.config,
            STORAGE,
            hub_ids=hub_api_ids(self.hub.url, self.hub.batch_token),
        )
        for group in self.names:
            lq = self.config.local_queue(self.names[group])
            wait_for(
                f"LocalQueue {lq} active",
                lambda g=group, lq=lq: any(
                    c["type"] == "Active" and c["status"] == "True"
                    for c in self.get("localqueues.kueue.x-k8s.io", lq, ns=self.ns(g))
                    .get("status", {})
                    .get("conditions", [])
                ),
                30,
            )
        ctx = make_context(self.backend, CATALOGUE, self.config, self.hub)
        self._service = running_service(ctx)
        self.service = await self._service.__aenter__()
        return self

    async def __aexit__(self, *exc):
        await self._service.__aexit__(*exc)
        await self.sa_client.close()
        await self.admin.close()
        delete_queue_layout(self.cluster, self.config, CATALOGUE)

    def get(self, *args, ns: str | None = None) -> dict:
        extra = ("-n", ns) if ns else ()
        return self.cluster.kubectl_json("get", *args, *extra)

    def user(self, prefix: str, groups: list[str]) -> tuple[str, str]:
        name = f"{prefix}{self.s}"
        return name, self.hub.add_user(name, [self.names.get(g, g) for g in groups])

    def pod_of(self, group: str, job_name: str) -> dict | None:
        pods = self.get("pods", "-l", f"batch.kubernetes.io/job-name={job_name}", ns=self.ns(group))
        running = [p for p in pods["items"] if p["status"].get("phase") == "Running"]
        return running[0] if running else None


async def until(what: str, fn, timeout: float = 45, interval: float = 0.5, env=None):
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    extra = ""
    while asyncio.get_running_loop().time() < deadline:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(interval)
    if env is not None:
        extra = f"; last status: {getattr(env, 'last_status', None)}"
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}{extra}")


async def status(env: Env, job_id: str, token: str) -> dict:
    r = await env.service.call("GET", f"api/jobs/{job_id}", token)
    assert r.status == 200, r.text
    return r.body


async def test_submit_to_admitted_job_on_the_right_flavor(k8s_cluster, hub):  # noqa: F811
    async with Env(
        k8s_cluster, hub, {"ml": {"cpu": 8, "memory": "32Gi", "accelerators": {"t4": 2}}}
    ) as env:
        alice, token = env.user("alice", ["ml"])
        r = await env.service.call(
            "POST",
            "api/jobs",
            token,
            {"name": "train", "script": "python train.py", "accelerator": "t4", "priority": "high"},
        )
        assert r.status == 201, r.text
        job_id, name = r.body["id"], r.body["name"]
        group = env.names["ml"]
        job = env.get("job", name, ns=env.ns("ml"))
        labels = job["metadata"]["labels"]
        assert labels[contract.KUEUE_QUEUE_LABEL] == contract.group_local_queue(group)
        assert labels[contract.KUEUE_PRIORITY_LABEL] == env.config.priority_class("high")
        assert labels[contract.LABEL_USER] == alice and labels[contract.LABEL_KIND] == "batch"

        body = await until(
            "admission",
            lambda: status(env, job_id, token),
        )
        body = await until(
            "admitted and running",
            lambda: _admitted_running(env, job_id, token),
        )
        assert body["queue"]["cluster_queue"] == env.config.cluster_queue(group)
        assert body["queue"]["flavors"]["nvidia.com/gpu"] == env.config.flavor("t4")
        assert body["queue"]["flavors"]["cpu"] == env.config.default_flavor()
        pod = wait_for("a running pod", lambda: env.pod_of("ml", name), 30)
        assert pod["spec"]["nodeName"] == "gpu-t4-01"

        # the queue page's numbers: Kueue's own sums on the group's LocalQueue, read
        # with the service account's rights
        async def counted():
            used = await env.backend.usage(group)
            return used if used.get("jobs") == 1 else None

        used = await until("Kueue to count the admitted job", counted)
        assert used["acc:t4"] == 1 and used["cpu"] > 0 and used["memory"] > 0, used
        # alice's notebook uid and private gid, and the gid of the group charged
        user_id, group_ids = hub.db_ids(alice)
        security = pod["spec"]["securityContext"]
        assert security["runAsUser"] == security["runAsGroup"] == DEFAULT_UID_BASE + user_id
        assert security["supplementalGroups"] == [DEFAULT_GID_BASE + group_ids[group]]
        assert pod["spec"]["containers"][0]["securityContext"]["runAsUser"] == security["runAsUser"]
        assert pod["status"]["hostIP"] == "127.0.11.1"
        # no kubelet behind KWOK: the API server cannot read logs; the service says so
        r = await env.service.call("GET", f"api/jobs/{job_id}/logs?index=0", token)
        assert r.status == 409 and "could not read pod" in r.body["message"], r.text


async def _admitted_running(env, job_id, token):
    body = await status(env, job_id, token)
    if body["queue"].get("admitted") and body["state"] == "running":
        return body
    env.last_status = body  # shown when a wait times out
    return None


async def test_second_job_beyond_quota_waits_with_position_then_cancel_frees(k8s_cluster, hub):  # noqa: F811
    quota = {"cms": {"cpu": 4, "memory": "16Gi", "accelerators": {"t4": 1}}}
    async with Env(k8s_cluster, hub, quota) as env:
        _, token = env.user("bob", ["cms"])
        sub = {"script": "sleep 1d", "accelerator": "t4"}
        first = (await env.service.call("POST", "api/jobs", token, sub)).body
        await until("first admitted", lambda: _admitted_running(env, first["id"], token))
        second = (await env.service.call("POST", "api/jobs", token, sub)).body
        # creation timestamps have 1 s resolution: equal ones leave Kueue's FIFO order open
        await asyncio.sleep(1.1)
        third = (await env.service.call("POST", "api/jobs", token, sub)).body

        async def pending_with_reason(job_id):
            body = await status(env, job_id, token)
            return body if "insufficient" in body["queue"].get("message", "") else None

        second_s = await until("second pending", lambda: pending_with_reason(second["id"]))
        third_s = await until("third pending", lambda: pending_with_reason(third["id"]))
        assert second_s["state"] == "queued" and not second_s["queue"]["admitted"]
        assert "nvidia.com/gpu" in second_s["queue"]["message"]
        # Kueue's visibility API when this cluster serves it, else the service's estimate
        served = env.cluster.kubectl(
            "get", "--raw", "/apis/visibility.kueue.x-k8s.io/v1beta2", check=False
        )
        expected = "visibility/v1beta2" if served.returncode == 0 else "estimate"
        assert second_s["queue"]["position_source"] == expected
        assert (second_s["queue"]["position"], third_s["queue"]["position"]) == (1, 2)
        if expected == "estimate":
            assert third_s["queue"]["pending_in_queue"] == 2

        r = await env.service.call("DELETE", f"api/jobs/{first['id']}", token)
        assert r.status == 200 and r.body["state"] == "cancelled"
        await until(
            "second admitted", lambda: _admitted_running(env, second["id"], token), 60, env=env
        )
        third_s = await status(env, third["id"], token)
        assert third_s["state"] == "queued" and third_s["queue"]["position"] == 1
        r = await env.service.call("GET", f"api/jobs/{first['id']}", token)
        assert r.status == 404  # cancelled Jobs are deleted with their pods and Workload


async def test_borrowing_from_an_idle_group_in_the_cohort(k8s_cluster, hub):  # noqa: F811
    quotas = {
        "lend": {"cpu": 8, "memory": "32Gi", "accelerators": {"rtx5000": 2}},
        "borrow": {"cpu": 8, "memory": "32Gi", "accelerators": {"rtx5000": 1}},
    }
    async with Env(k8s_cluster, hub, quotas) as env:
        _, token = env.user("erin", ["borrow"])
        r = await env.service.call(
            "POST", "api/jobs", token, {"script": "x", "accelerator": "rtx5000", "count": 2}
        )
        assert r.status == 201, r.text
        body = await until(
            "borrowing job admitted", lambda: _admitted_running(env, r.body["id"], token)
        )
        assert body["queue"]["cluster_queue"] == env.config.cluster_queue(env.names["borrow"])

        def borrowed():
            cq = env.get(
                "clusterqueues.kueue.x-k8s.io", env.config.cluster_queue(env.names["borrow"])
            )
            for fl in cq.get("status", {}).get("flavorsUsage", []):
                for res in fl["resources"]:
                    if res["name"] == "nvidia.com/gpu" and res.get("borrowed") == "1":
                        return res
            return None

        usage = wait_for("1 GPU borrowed", borrowed, 20)
        assert usage["total"] == "2"
        pod = wait_for("pod", lambda: env.pod_of("borrow", r.body["name"]), 30)
        assert pod["spec"]["nodeName"] == "gpu-rtx5000-01"


async def test_preemption_by_priority(k8s_cluster, hub):  # noqa: F811
    quota = {"phy": {"cpu": 8, "memory": "32Gi", "accelerators": {"mig-1g.10gb": 1}}}
    async with Env(k8s_cluster, hub, quota) as env:
        _, token = env.user("dave", ["phy"])
        sub = {"script": "x", "profile": "mig-small"}
        low = (await env.service.call("POST", "api/jobs", token, {**sub, "priority": "low"})).body
        await until("low admitted", lambda: _admitted_running(env, low["id"], token))
        pod = wait_for("low pod", lambda: env.pod_of("phy", low["name"]), 30)
        assert pod["spec"]["nodeName"] == "gpu-a100-mig-01"
        high = (await env.service.call("POST", "api/jobs", token, {**sub, "priority": "high"})).body
        await until("high admitted", lambda: _admitted_running(env, high["id"], token), 60)

        async def low_preempted():
            body = await status(env, low["id"], token)
            return body if body["queue"].get("reason") == "Preempted" else None

        body = await until("low preempted", low_preempted)
        assert body["state"] == "queued" and not body["queue"]["admitted"]
        assert body["priority"] == "low"


async def test_offload_lands_on_interlink_virtual_node(k8s_cluster, hub):  # noqa: F811
    quota = {"off": {"cpu": 4, "memory": "16Gi"}}
    async with Env(k8s_cluster, hub, quota, offload={"enabled": True}) as env:
        _, token = env.user("olga", ["off"])
        r = await env.service.call("POST", "api/jobs", token, {"script": "x", "offload": True})
        assert r.status == 201, r.text
        body = await until("offload admitted", lambda: _admitted_running(env, r.body["id"], token))
        assert body["offload"] is True
        assert body["queue"]["cluster_queue"] == env.config.offload_cluster_queue()
        pod = wait_for("pod", lambda: env.pod_of("off", r.body["name"]), 30)
        assert pod["spec"]["nodeName"] == "interlink-01"


async def test_cross_tenant_matrix_and_service_account_limits(k8s_cluster, hub):  # noqa: F811
    quotas = {g: {"cpu": 8, "memory": "16Gi"} for g in ("ga", "gb", "gc")}
    async with Env(k8s_cluster, hub, quotas) as env:
        users = {}
        for prefix, groups in (("u1", ["ga"]), ("u2", ["gb"]), ("u3", ["gc"]), ("u4", ["ga"])):
            name, token = env.user(prefix, groups)
            users[name] = (token, {env.names[g] for g in groups})
        jobs = {}
        for name, (token, _) in users.items():
            r = await env.service.call("POST", "api/jobs", token, {"script": "sleep 1d"})
            assert r.status == 201, r.text
            jobs[name] = r.body["id"]
        probes, refusals, failures = await cross_tenant_matrix(env.service, users, jobs)
        # 4 users, u1 and u4 share ga: 5 unordered pairs, 10 ordered, 6 probes each
        assert failures == []
        assert (probes, refusals) == (60, 60)
        for name, (token, _) in users.items():
            r = await env.service.call("GET", f"api/jobs/{jobs[name]}", token)
            assert r.status == 200 and r.body["state"] != "cancelled"

        # the service's own identity cannot create Jobs outside the groups' namespaces
        sa = KubeAPI(env.sa_client)
        job = env.get("job", jobs[next(iter(users))].split("/")[1], ns=env.ns("ga"))
        job["metadata"] = {"name": "escape", "namespace": "default"}
        with pytest.raises(KubeError) as err:
            await sa.request("POST", "/apis/batch/v1/namespaces/default/jobs", body=job)
        assert err.value.status == 403
        with pytest.raises(KubeError) as err:
            await sa.request("GET", "/apis/batch/v1/jobs")  # cluster-wide list
        assert err.value.status == 403
