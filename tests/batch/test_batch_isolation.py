"""A local batch service that cannot run jobs under their owners' uids refuses them (issue 10).

The real service (a real hub's HubAuth, the local backend as ``BatchService`` builds
it, with ``isolate_users`` "auto") but without the hub's user ids: it used to run
every job as the service's own user (root here); now each submission is a 503 that
says why and what to change, and nothing is created.
"""

from __future__ import annotations

import os

from labfleet_batch.local import LocalBackend
from labfleet_spawner.devices import DeviceAllocator

from tests.batch.harness import make_context, running_service
from tests.batch.test_batch_local_api import CATALOGUE, groups, qconfig, storage_root, unique

__all__ = ["groups", "qconfig", "storage_root"]  # fixtures shared with the local API tests


async def test_jobs_are_refused_where_they_cannot_be_isolated(hub, qconfig, storage_root, groups):
    # what BatchService.make_backend passes with isolate_users "auto" and no hub ids
    backend = LocalBackend(
        qconfig, str(storage_root), allocator=DeviceAllocator([]), hub_ids=None,
        isolate_users="auto", kill_grace=1,
    )  # fmt: skip
    assert backend.isolate is False and backend.refusal
    ml = groups["ml"]
    user = unique("alice")
    token = hub.add_user(user, [ml])
    async with running_service(make_context(backend, CATALOGUE, qconfig, hub)) as service:
        r = await service.call("POST", "api/jobs", token, {"command": ["id"], "group": ml})
        assert r.status == 503, r.text
        message = r.body["message"]
        assert "batch jobs cannot run under their users' own uids" in message
        if os.geteuid() == 0:
            assert "job_ids_from_hub" in message and "Nothing runs as root" in message
        else:
            assert f"runs as uid {os.geteuid()}, not root" in message
        assert "spawner.isolate_users: no" in message
        assert (await service.call("GET", "api/jobs", token)).body["jobs"] == []
    await backend.close()
    # nothing was created for the user
    assert not (storage_root / "home" / user).exists()
