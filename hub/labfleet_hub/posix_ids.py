"""The hub's user and group ids, for services that must act as a user's notebook.

Notebooks run as uid ``uid_base + <user number>`` (private gid of the same
number) with one supplementary gid ``gid_base + <group number>`` per group, in
single-node and Kubernetes mode alike, so files on the shared filesystem keep
one owner. A batch Job writes to the same home and group folders and must run
with the same ids, but the hub's REST API does not expose them. The
hub therefore serves::

    GET /hub/api/labfleet/posix-ids/<user>
    -> {"name": "alice", "id": 3, "groups": {"ml": 2, "users": 1}}

allowed only with the custom scope ``custom:labfleet:posix-ids`` (the batch
service's role has it; users and notebooks do not); the handler is
:class:`labfleet_hub.api_handlers.PosixIdsHandler`, this module is the
services' side and imports nothing of the hub's server. The ids are the numbers the
spawners use too, never handed to another name (:mod:`labfleet_hub.posix_registry`;
the hub's own database ids are reused on SQLite): the caller adds its configured
bases, exactly as the spawners do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

#: The custom scope that lets a service read a user's hub ids.
POSIX_IDS_SCOPE = "custom:labfleet:posix-ids"
CUSTOM_SCOPES = {
    POSIX_IDS_SCOPE: {
        "description": "Read a user's hub user and group ids (labfleet services).",
    }
}

#: ``username -> (hub user id, {hub group name: hub group id})``.
HubIds = Callable[[str], Awaitable[tuple[int, dict[str, int]]]]


class HubIdsUnavailable(Exception):
    """The hub could not say which ids a user has; the message is meant for the user."""


def hub_api_ids(
    api_url: str, api_token: str, timeout: float = 10.0, cache_seconds: float = 60.0
) -> HubIds:
    """A :data:`HubIds` lookup through the hub's REST API with a service token.

    Answers are kept ``cache_seconds``: a user's ids never change, and a new
    group membership reaches jobs within that time, while a burst of
    submissions costs the hub one request per user, not one per job.
    """
    cache: dict[str, tuple[float, tuple[int, dict[str, int]]]] = {}

    async def ids(username: str) -> tuple[int, dict[str, int]]:
        now = time.monotonic()
        hit = cache.get(username)
        if hit is not None and hit[0] > now:
            user_id, groups = hit[1]
            return user_id, dict(groups)
        user_id, groups = await fetch(username)
        cache[username] = (now + cache_seconds, (user_id, groups))
        return user_id, dict(groups)

    async def fetch(username: str) -> tuple[int, dict[str, int]]:
        request = HTTPRequest(
            f"{api_url.rstrip('/')}/labfleet/posix-ids/{quote(username, safe='')}",
            headers={"Authorization": f"token {api_token}"},
            request_timeout=timeout,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as e:
            # 403: the service's role lacks the scope; 404: not a hub user
            raise HubIdsUnavailable(
                f"the hub refused the ids of {username!r} (HTTP {e.code}); the batch "
                f"service needs the scope {POSIX_IDS_SCOPE}"
                if e.code == 403
                else f"the hub has no user {username!r} (HTTP {e.code})"
            ) from None
        except OSError as e:
            raise HubIdsUnavailable(f"the hub is unreachable for user ids: {e}") from None
        data = json.loads(response.body)
        return int(data["id"]), {str(k): int(v) for k, v in data["groups"].items()}

    return ids
