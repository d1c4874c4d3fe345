"""labfleet's own routes in the hub's REST API, served through the authenticator.

Kept apart from the clients (:mod:`labfleet_hub.tokens` for notebooks,
:mod:`labfleet_hub.posix_ids` for services) because these import the hub's
server side, which the clients' processes should not load.

- ``GET /hub/api/labfleet/iam-token/<user>``: a fresh IAM access token
  (scope ``custom:labfleet:iam-token``);
- ``GET /hub/api/labfleet/posix-ids/<user>``: the user's hub ids (scope
  ``custom:labfleet:posix-ids``).
"""

from __future__ import annotations

import json

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.scopes import has_scope
from tornado import web

from .posix_ids import POSIX_IDS_SCOPE
from .posix_registry import posix_ids
from .tokens import IAM_TOKEN_SCOPE


def require_user_scope(handler: APIHandler, scope: str, user_name: str, action: str) -> None:
    """403 unless the request's token holds ``scope`` for ``user_name``.

    Checked in the handler, not with ``@needs_scope``: custom scopes only exist
    once the hub has started, after this module is imported.
    """
    if handler.current_user is None:
        raise web.HTTPError(403, "authentication required")
    if not has_scope(f"{scope}!user={user_name}", handler.parsed_scopes, db=handler.db):
        raise web.HTTPError(
            403, f"this token may not {action} {user_name} (needs scope {scope}!user={user_name})"
        )


class IAMTokenHandler(APIHandler):
    """``GET /hub/api/labfleet/iam-token/<user>``: a fresh access token as JSON."""

    async def get(self, user_name):
        require_user_scope(self, IAM_TOKEN_SCOPE, user_name, "obtain IAM tokens for")
        user = self.find_user(user_name)
        if user is None:
            raise web.HTTPError(404)
        token = await self.authenticator.fresh_access_token(user)
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(token))


class PosixIdsHandler(APIHandler):
    """``GET /hub/api/labfleet/posix-ids/<user>``: the user's hub ids as JSON."""

    async def get(self, user_name):
        require_user_scope(self, POSIX_IDS_SCOPE, user_name, "read the hub ids of")
        user = self.find_user(user_name)
        if user is None:
            self.set_status(404)
            self.write(json.dumps({"status": 404, "message": f"no hub user {user_name!r}"}))
            return
        # the never-reused numbers the spawners give the same user (posix_registry)
        user_number, groups = posix_ids(user, self.db)
        self.write(json.dumps({"name": user.name, "id": user_number, "groups": groups}))


#: The routes an Authenticator's ``get_handlers`` adds (the hub prefixes them with /hub).
IAM_TOKEN_HANDLERS = [(r"/api/labfleet/iam-token/([^/]+)", IAMTokenHandler)]
POSIX_IDS_HANDLERS = [(r"/api/labfleet/posix-ids/([^/]+)", PosixIdsHandler)]
