"""Issue 10, API hardening of the batch service, for real: a real hub for tokens, the
service's tornado server on loopback (and behind the real configurable-http-proxy).

- a body over the limit is read to its end and answered with a JSON 413 naming the
  limit, also through the proxy (which answered its own 503 page when the service
  closed the connection on the unread body);
- the caps on waiting jobs per user and per group answer 429 and create nothing.
"""

from __future__ import annotations

import contextlib
import json
import os

import httpx
from labfleet_batch.local import LocalBackend
from labfleet_batch.openapi import DOCUMENT
from labfleet_batch.validation import Limits
from labfleet_hub.bodylimit import MAX_BODY_BYTES
from labfleet_hub.posix_ids import hub_api_ids
from labfleet_spawner.devices import DeviceAllocator

from tests.batch import test_batch_local_api as local_api
from tests.batch.harness import make_context, running_service
from tests.proxy import assert_json_413, real_proxy

# the local backend's fixtures: fresh groups and users on the session's hub
groups, qconfig, storage_root, users = (
    local_api.groups,
    local_api.qconfig,
    local_api.storage_root,
    local_api.users,
)
CATALOGUE, by_prefix, unique = local_api.CATALOGUE, local_api.by_prefix, local_api.unique


@contextlib.asynccontextmanager
async def capped_service(hub, qconfig, storage_root, **limits):
    backend = LocalBackend(
        qconfig,
        str(storage_root),
        allocator=DeviceAllocator([]),
        hub_ids=hub_api_ids(hub.url, hub.batch_token),
        kill_grace=2,
        isolate=os.geteuid() == 0,  # as root under mapped uids; else as the test's user
    )
    ctx = make_context(backend, CATALOGUE, qconfig, hub, limits=Limits(min_run_time=1, **limits))
    async with running_service(ctx) as svc:
        yield svc
    await backend.close()


async def test_oversize_bodies_get_a_json_413_directly_and_through_the_proxy(
    hub, qconfig, storage_root, users
):
    _, token = by_prefix(users, "alice")
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
    async with capped_service(hub, qconfig, storage_root) as svc:
        origin = svc.url.split("/services/")[0]
        with real_proxy(origin) as proxied:
            async with httpx.AsyncClient(timeout=60) as client:
                for base in (origin, proxied):
                    url = base + "/services/batch/api/jobs"
                    for size in (MAX_BODY_BYTES + 1, 10 * 1024 * 1024):
                        # a JSON document just over the limit (a long script)
                        payload = json.dumps({"script": "x" * size}).encode()
                        r = await client.post(url, content=payload, headers=headers)
                        assert_json_413(r)
                    # without a token: the JSON 401 of prepare, also after a large body
                    no_token = {"Content-Type": "application/json"}
                    r = await client.post(url, content=payload, headers=no_token)
                    assert r.status_code == 401 and "token" in r.json()["message"], r.text
                    # within the limit: an ordinary answer (here 400: the script's limit)
                    body = json.dumps({"script": "x" * (MAX_BODY_BYTES - 100)})
                    r = await client.post(url, content=body, headers=headers)
                    assert r.status_code == 400 and "script" in r.json()["message"], r.text
                    # the connection stays usable after a 413
                    r = await client.get(base + "/services/batch/api/jobs", headers=headers)
                    assert r.status_code == 200 and r.json()["jobs"] == []
                # the OpenAPI document, without a token
                r = await client.get(origin + "/services/batch/api/openapi.json")
                assert r.status_code == 200
                assert r.json()["servers"] == [{"url": "/services/batch"}]
                assert r.json()["paths"] == json.loads(json.dumps(DOCUMENT["paths"]))
    assert not (storage_root / "home").exists() or not any((storage_root / "home").iterdir())


async def test_waiting_jobs_capped_per_user_and_per_group(hub, groups, qconfig, storage_root):
    cms = groups["cms"]  # max_running 1, cpu 1: one job runs, the rest wait
    bob = unique("bob")
    bob_token = hub.add_user(bob, [cms])
    eve = unique("eve")
    eve_token = hub.add_user(eve, [cms])
    limits = {"max_waiting_per_user": 2, "max_waiting_per_group": 3}
    async with capped_service(hub, qconfig, storage_root, **limits) as svc:

        async def submit(token, script="echo hi"):
            return await svc.call("POST", "api/jobs", token, {"script": script, "group": cms})

        async def count(token):
            return len((await svc.call("GET", "api/jobs", token)).body["jobs"])

        running = await submit(bob_token, "sleep 60")
        assert running.status == 201, running.text
        await svc.wait_state(running.body["id"], bob_token, {"running"})
        waiting = [await submit(bob_token) for _ in range(2)]
        assert [r.status for r in waiting] == [201, 201], [r.text for r in waiting]
        # the user's cap: the third waiting job is refused, nothing is created
        before = sorted(p.name for p in (storage_root / "home" / bob / "batch").iterdir())
        r = await submit(bob_token)
        assert r.status == 429, r.text
        assert r.body["message"].startswith("you have 2 jobs waiting; the cap is 2"), r.body
        assert "max_waiting_per_user" in r.body["message"]
        assert await count(bob_token) == 3
        after = sorted(p.name for p in (storage_root / "home" / bob / "batch").iterdir())
        assert after == before
        # the group's cap: eve may add one waiting job (3 in the group), not two
        assert (await submit(eve_token)).status == 201
        r = await submit(eve_token)
        assert r.status == 429, r.text
        assert f"group {cms} has 3 jobs waiting; the cap is 3" in r.body["message"], r.body
        assert "max_waiting_per_group" in r.body["message"]
        assert await count(eve_token) == 1
        # a waiting job cancelled: bob may submit again
        cancelled = await svc.call("DELETE", f"api/jobs/{waiting[0].body['id']}", bob_token)
        assert cancelled.status == 200 and cancelled.body["state"] == "cancelled"
        r = await submit(bob_token)
        assert r.status == 201, r.text
        assert await count(bob_token) == 4
        for job in (await svc.call("GET", "api/jobs", bob_token)).body["jobs"]:
            await svc.call("DELETE", f"api/jobs/{job['id']}", bob_token)


def test_the_caps_have_defaults_and_platform_keys():
    from labfleet_batch.service import BatchService

    service = BatchService()
    assert service.make_limits().max_waiting_per_user == 100
    assert service.make_limits().max_waiting_per_group == 500
    service = BatchService(limits={"max_waiting_per_user": 7})  # batch.limits in the YAML
    assert service.make_limits().max_waiting_per_user == 7
