"""A new user never gets a deleted user's home through a reused hub id (issue 10).

The real batch service with the local backend (jobs under their owners' uids, ids
from the real hub's ids endpoint) as root: x's job leaves a file in x's home, x is
deleted, y is created (SQLite gives y x's hub id) and y's job tries to read it.
"""

from __future__ import annotations

import os

import pytest

from tests.batch.test_batch_local_api import (
    groups,
    local_service,
    qconfig,
    storage_root,
    t4,
    unique,
)

__all__ = ["groups", "qconfig", "storage_root", "t4"]  # fixtures shared with the API tests

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs run under users' uids as root")


async def test_a_new_user_cannot_read_a_deleted_users_home(hub, qconfig, storage_root, groups, t4):
    ml = groups["ml"]
    old, new = unique("gone"), unique("next")
    async with local_service(hub, qconfig, storage_root, [t4]) as service:
        token = hub.add_user(old, [ml])
        r = await service.call(
            "POST", "api/jobs", token,
            {"script": "echo private > $LABFLEET_HOME/secret; id -u", "group": ml},
        )  # fmt: skip
        assert r.status == 201, r.text
        done = await service.wait_state(r.body["id"], token, {"succeeded", "failed"})
        assert done["state"] == "succeeded", done
        old_home = storage_root / "home" / old
        assert (old_home / "secret").read_text() == "private\n"
        old_hub_id = hub.hub_db_ids(old)[0]

        hub.api("DELETE", f"/users/{old}")
        token = hub.add_user(new, [ml])
        assert hub.hub_db_ids(new)[0] == old_hub_id  # the hub reused the id
        r = await service.call(
            "POST", "api/jobs", token,
            {"script": f"id -u; cat {old_home}/secret 2>/dev/null || echo refused", "group": ml},
        )  # fmt: skip
        assert r.status == 201, r.text
        done = await service.wait_state(r.body["id"], token, {"succeeded", "failed"})
        logs = await service.call("GET", f"api/jobs/{r.body['id']}/logs?index=0", token)
        uid, answer = logs.text.splitlines()[:2]
        assert int(uid) != old_home.stat().st_uid, logs.text
        assert answer == "refused" and "private" not in logs.text, logs.text
        assert (storage_root / "home" / new).stat().st_uid == int(uid)
