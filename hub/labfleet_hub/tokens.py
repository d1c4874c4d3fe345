"""Fresh IAM access tokens for code running in a notebook.

Notebooks never receive the IAM refresh token or the client secret. Instead
the hub serves ``GET /hub/api/labfleet/iam-token/<user>``: authenticated with
the notebook's own ``JUPYTERHUB_API_TOKEN`` and allowed only with the custom
scope ``custom:labfleet:iam-token`` for that user, it answers a currently
valid access token, refreshing it with the refresh token kept in the hub's
encrypted auth state when it is about to expire.

In a notebook::

    from labfleet_hub.tokens import get_access_token
    token = get_access_token()          # always fresh; call it per request
"""

from __future__ import annotations

import json
import os
import urllib.request

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.scopes import has_scope
from tornado import web

#: The custom scope that lets a token obtain its owner's IAM access token.
IAM_TOKEN_SCOPE = "custom:labfleet:iam-token"
CUSTOM_SCOPES = {
    IAM_TOKEN_SCOPE: {
        "description": "Obtain a fresh IAM access token for the user (labfleet).",
    }
}


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


def get_access_token(
    api_url: str | None = None,
    api_token: str | None = None,
    user: str | None = None,
    timeout: float = 10.0,
) -> str:
    """A fresh IAM access token for the notebook's user (reads the JupyterHub env by default)."""
    api_url = api_url or os.environ["JUPYTERHUB_API_URL"]
    api_token = api_token or os.environ["JUPYTERHUB_API_TOKEN"]
    user = user or os.environ["JUPYTERHUB_USER"]
    request = urllib.request.Request(
        f"{api_url.rstrip('/')}/labfleet/iam-token/{user}",
        headers={"Authorization": f"token {api_token}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)["access_token"]
