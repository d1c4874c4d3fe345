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


# -- ids are never reused (issue 10) ------------------------------------------------------
#
# On SQLite the hub gives a new user (or group) the id of the newest one deleted. The
# uid and gids used to be made of those ids, so the new user owned the old user's home
# and the new group's members got into the old group's folder. The numbers now come
# from labfleet_hub.posix_registry: a number is never handed to another name.


async def test_a_new_user_never_gets_a_deleted_users_uid(hub):
    old, new = "gone" + uuid.uuid4().hex[:6], "next" + uuid.uuid4().hex[:6]
    hub.add_user(old, [])
    old_number = (await hub_api_ids(hub.url, hub.batch_token, cache_seconds=0)(old))[0]
    old_hub_id = hub.hub_db_ids(old)[0]
    hub.api("DELETE", f"/users/{old}")
    hub.add_user(new, [])
    assert hub.hub_db_ids(new)[0] == old_hub_id  # the hub reused its id ...
    new_number = (await hub_api_ids(hub.url, hub.batch_token, cache_seconds=0)(new))[0]
    assert new_number != old_number  # ... its uid is not the deleted user's
    assert new_number > old_number and hub.db_ids(new)[0] == new_number
    # a name created again is the same account (home/<name>): it gets its number back
    hub.add_user(old, [])
    assert (await hub_api_ids(hub.url, hub.batch_token, cache_seconds=0)(old))[0] == old_number
    # and the next new name still gets a number nobody had
    third = "more" + uuid.uuid4().hex[:6]
    hub.add_user(third, [])
    third_number = (await hub_api_ids(hub.url, hub.batch_token, cache_seconds=0)(third))[0]
    assert third_number not in (old_number, new_number)


async def test_a_new_group_never_gets_a_deleted_groups_gid(hub):
    member = "memb" + uuid.uuid4().hex[:6]
    old, new = "gone" + uuid.uuid4().hex[:6], "next" + uuid.uuid4().hex[:6]
    hub.add_user(member, [old])
    ids = hub_api_ids(hub.url, hub.batch_token, cache_seconds=0)
    old_number = (await ids(member))[1][old]
    old_hub_id = hub.hub_db_ids(member)[1][old]
    hub.api("DELETE", f"/groups/{old}")
    hub.add_user(member, [new])
    assert hub.hub_db_ids(member)[1] == {new: old_hub_id}  # the hub reused its id ...
    new_number = (await ids(member))[1][new]
    assert new_number != old_number  # ... its gid is not the deleted group's
    assert hub.db_ids(member)[1] == {new: new_number}


async def test_ids_given_before_stay_the_same(hub):
    """Numbers already handed out (at the first use, every user's own hub id) never move."""
    names = ["keep" + uuid.uuid4().hex[:6] for _ in range(3)]
    for name in names:
        hub.add_user(name, ["ml"])
    ids = hub_api_ids(hub.url, hub.batch_token, cache_seconds=0)
    before = {name: await ids(name) for name in names}
    hub.api("DELETE", f"/users/{names[1]}")
    other = "else" + uuid.uuid4().hex[:6]
    hub.add_user(other, ["ml"])
    await ids(other)
    for name in (names[0], names[2]):
        assert await ids(name) == before[name]
