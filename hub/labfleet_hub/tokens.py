"""Fresh IAM access tokens for code running in a notebook.

Notebooks never receive the IAM refresh token or the client secret. Instead
the hub serves ``GET /hub/api/labfleet/iam-token/<user>``
(:class:`labfleet_hub.api_handlers.IAMTokenHandler`): authenticated with
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

#: The custom scope that lets a token obtain its owner's IAM access token.
IAM_TOKEN_SCOPE = "custom:labfleet:iam-token"
CUSTOM_SCOPES = {
    IAM_TOKEN_SCOPE: {
        "description": "Obtain a fresh IAM access token for the user (labfleet).",
    }
}


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
