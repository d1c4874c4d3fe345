"""A token revoked at the hub stops working at the batch service (issue 10).

The service authenticates every request with HubAuth, which keeps the hub's
answer for a token in a cache (JupyterHub's default: 300 s). A notebook's
token revoked by stopping its server, or deleted, used to go on submitting and
cancelling jobs until the cache expired. Now requests that change something ask
the hub every time, and reads are cached only ``AUTH_CACHE_SECONDS``: the real
service's own HubAuth (built by ``BatchService.initialize``) against a real hub.
"""

from __future__ import annotations

import asyncio
import json
import time

from labfleet_batch.local import LocalBackend
from labfleet_batch.service import BatchService, Context
from labfleet_hub.hubauth import AUTH_CACHE_SECONDS
from labfleet_spawner.devices import DeviceAllocator

from tests.batch.harness import running_service
from tests.batch.hub import BATCH_SCOPE
from tests.batch.test_batch_local_api import CATALOGUE, groups, qconfig, storage_root, unique

__all__ = ["groups", "qconfig", "storage_root"]  # fixtures shared with the local API tests


def service_hub_auth(hub, monkeypatch):
    """The HubAuth ``BatchService`` builds from the environment the hub gives it."""
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.batch_token)
    monkeypatch.setenv("JUPYTERHUB_API_URL", hub.url)
    monkeypatch.setenv("JUPYTERHUB_SERVICE_NAME", "batch")
    monkeypatch.setenv("JUPYTERHUB_OAUTH_ACCESS_SCOPES", json.dumps([BATCH_SCOPE]))
    app = BatchService()
    app.initialize([])
    assert app.hub_auth.cache_max_age == AUTH_CACHE_SECONDS <= 10
    return app.hub_auth


async def test_a_revoked_token_is_refused_at_once_for_changes_and_soon_for_reads(
    hub, qconfig, storage_root, groups, monkeypatch
):
    # a backend that refuses every job with 503 (no hub ids): a 503 means the token passed
    backend = LocalBackend(
        qconfig, str(storage_root), allocator=DeviceAllocator([]), hub_ids=None,
        isolate_users="auto", kill_grace=1,
    )  # fmt: skip
    ml = groups["ml"]
    user = unique("revoked")
    hub.add_user(user, [ml])
    made = hub.api("POST", f"/users/{user}/tokens", {"scopes": [BATCH_SCOPE], "note": "revoke"})
    token, token_id = made["token"], made["id"]
    ctx = Context(backend, CATALOGUE, qconfig, service_hub_auth(hub, monkeypatch))
    submit, cancel = {"command": ["true"], "group": ml}, f"api/jobs/{ml}/nosuchjob"
    async with running_service(ctx) as service:
        assert (await service.call("GET", "api/jobs", token)).status == 200
        r = await service.call("POST", "api/jobs", token, submit)
        assert r.status == 503, r.text  # accepted by the hub, refused by the backend
        assert (await service.call("DELETE", cancel, token)).status == 404

        hub.api("DELETE", f"/users/{user}/tokens/{token_id}")
        revoked_at = time.monotonic()
        # changes: refused at once, though the token's answer is in the cache
        r = await service.call("POST", "api/jobs", token, submit)
        assert r.status in (401, 403), r.text
        assert (await service.call("DELETE", cancel, token)).status in (
            401,
            403,
        )
        # reads: refused once the short cache expires (generous bound for a loaded machine)
        while (status := (await service.call("GET", "api/jobs", token)).status) == 200:
            assert time.monotonic() - revoked_at < AUTH_CACHE_SECONDS + 20, "still reading"
            await asyncio.sleep(0.5)
        assert status in (401, 403)
        # another user's valid token is not affected
        other = hub.add_user(unique("valid"), [ml])
        assert (await service.call("GET", "api/jobs", other)).status == 200
    await backend.close()
