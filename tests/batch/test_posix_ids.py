"""The hub's ids endpoint (labfleet_hub.posix_ids) on a real JupyterHub.

A batch Job must run with its owner's notebook uid/gids; the batch service
learns the hub ids behind them from ``/hub/api/labfleet/posix-ids/<user>``
with its own token. Users' tokens must not read anyone's ids.
"""

from __future__ import annotations

import urllib.error
import uuid

import pytest
from labfleet_hub.posix_ids import HubIdsUnavailable, hub_api_ids


async def test_service_reads_the_ids_the_hub_database_holds(hub):
    name = "ids" + uuid.uuid4().hex[:6]
    hub.add_user(name, ["ml", "physics"])
    via_api = await hub_api_ids(hub.url, hub.batch_token)(name)
    # the same numbers the spawners add their uid/gid bases to
    via_db = hub.db_ids(name)
    assert via_api == via_db
    user_id, groups = via_api
    assert user_id >= 1 and set(groups) == {"ml", "physics"}


async def test_unknown_user_is_a_clear_error(hub):
    with pytest.raises(HubIdsUnavailable, match="has no user 'nobody-here'"):
        await hub_api_ids(hub.url, hub.batch_token)("nobody-here")


async def test_user_tokens_may_not_read_ids(hub):
    """A user's token, even one with every scope a user has, reads no ids, not even its own."""
    name = "idsu" + uuid.uuid4().hex[:6]
    token = hub.add_user(name, ["ml"], scopes=["inherit"])
    other = "idso" + uuid.uuid4().hex[:6]
    hub.add_user(other, ["ml"])
    probes = refused = 0
    for target in (name, other):
        probes += 1
        with pytest.raises(HubIdsUnavailable, match="needs the scope custom:labfleet:posix-ids"):
            await hub_api_ids(hub.url, token)(target)
        refused += 1
        with pytest.raises(urllib.error.HTTPError) as err:
            hub.api("GET", f"/labfleet/posix-ids/{target}", token=token)
        assert err.value.code == 403
    assert probes == refused == 2


async def test_answers_are_cached_for_a_while_then_refreshed(hub):
    name = "idsc" + uuid.uuid4().hex[:6]
    hub.add_user(name, ["ml"])
    cached = hub_api_ids(hub.url, hub.batch_token, cache_seconds=3600)
    fresh = hub_api_ids(hub.url, hub.batch_token, cache_seconds=0)
    assert set((await cached(name))[1]) == set((await fresh(name))[1]) == {"ml"}
    hub.add_user(name, ["cms"])  # a new group membership
    # within cache_seconds the old answer stands (one hub request per user per burst) ...
    assert set((await cached(name))[1]) == {"ml"}
    # ... and once it expires the new group is seen
    assert set((await fresh(name))[1]) == {"ml", "cms"}
