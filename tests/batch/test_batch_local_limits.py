"""A single node's group limits changed at once through ``api/limits`` (issue 16), for real:
a real hub for the tokens, the tornado app on loopback, jobs as real processes.

The accounting service calls this API with its hub service token; here the hub's
``provisioner`` service stands in for it (``Context.limit_managers``).
"""

from __future__ import annotations

import json
import os
import stat

from labfleet_batch.local_limits import LimitsStore

from tests.batch import test_batch_local_api as local_api

# the local API tests' fixtures and helpers, shared
by_prefix, local_service = local_api.by_prefix, local_api.local_service
groups, qconfig, storage_root = local_api.groups, local_api.qconfig, local_api.storage_root
t4, users = local_api.t4, local_api.users

GPU = ("labfleet-t4", "nvidia.com/gpu")


def gpu_limit(body: dict) -> str:
    return next(q["nominalQuota"] for q in body["quotas"] if (q["flavor"], q["resource"]) == GPU)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_only_the_accounting_service_reads_and_changes_limits(
    hub,
    qconfig,
    storage_root,
    t4,
    users,
    groups,
    tmp_path,
):
    ml = groups["ml"]
    async with local_service(hub, qconfig, storage_root, [t4]) as service:
        service.ctx.limit_managers = ("provisioner",)
        service.ctx.limits_store = LimitsStore(tmp_path / "batch")
        body = {"quotas": [{"flavor": GPU[0], "resource": GPU[1], "nominalQuota": "1"}]}
        # people -- a member, the group's admin -- are refused: they use the quota page
        for prefix in ("alice", "carol"):
            _, token = by_prefix(users, prefix)
            for method in ("GET", "PUT"):
                r = await service.call(
                    method, f"api/limits/{ml}", token, body if method == "PUT" else None
                )
                assert r.status == 403, (prefix, method, r.text)
                assert "accounting service's quota page" in r.body["message"]
        assert (await service.call("GET", f"api/limits/{ml}", None)).status == 401
        # the batch service's own token is a service's, but not one that manages limits
        r = await service.call("PUT", f"api/limits/{ml}", hub.batch_token, body)
        assert r.status == 403
        r = await service.call("GET", f"api/limits/{ml}", hub.admin_token)
        assert r.status == 200 and gpu_limit(r.body) == "2"
        assert (await service.call("GET", "api/limits/nogroup", hub.admin_token)).status == 404
        # refused changes name the field and change nothing (not even the stored file)
        for quotas, field in (
            ([{"flavor": "labfleet-h100", "resource": GPU[1], "nominalQuota": "1"}], ".flavor"),
            ([{"flavor": GPU[0], "resource": GPU[1], "nominalQuota": "-1"}], ".nominalQuota"),
            ([{"flavor": GPU[0], "resource": GPU[1], "borrowingLimit": "1"}], ".borrowingLimit"),
        ):
            r = await service.call("PUT", f"api/limits/{ml}", hub.admin_token, {"quotas": quotas})
            assert r.status == 400 and f"quotas[0]{field}" in r.body["message"], r.text
        assert not service.ctx.limits_store.path.exists()
        assert service.ctx.config.groups[ml].accelerators == {"t4": 2}


async def test_lowered_limit_keeps_running_jobs_and_raised_limit_starts_waiting_ones(
    hub,
    qconfig,
    storage_root,
    t4,
    users,
    groups,
    tmp_path,
):
    from labfleet_spawner.nvml import GpuDevice

    ml = groups["ml"]
    t4b = GpuDevice(1, "GPU-fake-t4-1", "Tesla T4")
    _, token = by_prefix(users, "alice")
    async with local_service(hub, qconfig, storage_root, [t4, t4b]) as service:
        service.ctx.limit_managers = ("provisioner",)
        store = LimitsStore(tmp_path / "batch")
        service.ctx.limits_store = store

        async def set_gpus(n: int) -> dict:
            body = {"quotas": [{"flavor": GPU[0], "resource": GPU[1], "nominalQuota": str(n)}]}
            r = await service.call("PUT", f"api/limits/{ml}", hub.admin_token, body)
            assert r.status == 200, r.text
            return r.body

        job = {"script": "sleep 60", "profile": "gpu-t4", "group": ml}
        first = (await service.call("POST", "api/jobs", token, job)).body
        running = await service.wait_state(first["id"], token, {"running"})
        pid = service.ctx.backend._jobs[(ml, first["name"])].pids[0][0]

        changed = await set_gpus(0)
        assert gpu_limit(changed) == "0" and gpu_limit({"quotas": changed["before"]}) == "2"
        held = next(u for u in changed["in_use"] if (u["flavor"], u["resource"]) == GPU)
        assert held == {"flavor": GPU[0], "resource": GPU[1], "used": "1", "over": True}
        # kept at once, privately: a restart starts from it
        assert json.loads(store.path.read_text())["groups"][ml]["accelerators"] == {"t4": 0}
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600

        second = (await service.call("POST", "api/jobs", token, job)).body
        waiting = (await service.call("GET", f"api/jobs/{second['id']}", token)).body
        assert waiting["state"] == "queued", waiting
        assert "lowered while they ran" in waiting["queue"]["message"], waiting
        # the running job was not stopped by the lowered limit
        r = await service.call("GET", f"api/jobs/{running['id']}", token)
        assert r.body["state"] == "running" and alive(pid)

        await set_gpus(1)  # still 1 in use: the second waits
        r = await service.call("GET", f"api/jobs/{second['id']}", token)
        assert r.body["state"] == "queued", r.body
        assert "insufficient quota for t4" in r.body["queue"]["message"]
        await set_gpus(2)  # now it fits: it starts without anything else happening
        await service.wait_state(second["id"], token, {"running"}, timeout=10)
        r = await service.call("GET", f"api/jobs/{running['id']}", token)
        assert r.body["state"] == "running" and alive(pid)
        for job_id in (first["id"], second["id"]):
            await service.call("DELETE", f"api/jobs/{job_id}", token)
