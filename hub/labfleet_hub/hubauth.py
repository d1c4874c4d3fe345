"""How labfleet's hub services (batch, accounting) learn who calls them, and for how long.

JupyterHub's ``HubAuth`` keeps the hub's answer for a token (or an OAuth
cookie's token) for ``cache_max_age``, 300 s by default: a token revoked at
the hub (deleted on the token page, or a notebook's, when its server stops)
would go on working that long. labfleet's services:

- keep an answer only :data:`AUTH_CACHE_SECONDS` (``auth_cache_seconds``,
  :class:`AuthCacheConfig`), and only for requests that read (GET, HEAD);
- ask the hub on every request that changes something (submit, cancel, a
  budget or quota change): :class:`FreshHubOAuth` skips the cache for them,
  whether the token came in the ``Authorization`` header or the OAuth cookie
  (whose XSRF check stays HubOAuth's own).
"""

from __future__ import annotations

import contextvars

from jupyterhub.services.auth import HubOAuth
from traitlets import Integer
from traitlets.config import Configurable

#: Seconds a hub answer may serve reads after the token was revoked.
AUTH_CACHE_SECONDS = 5
#: Requests that read; any other method changes something and asks the hub.
READ_METHODS = frozenset(("GET", "HEAD"))

_fresh = contextvars.ContextVar("labfleet_hub_auth_fresh", default=False)


def reads(method: str) -> bool:
    """Whether a request with this HTTP method may be answered from the cache."""
    return method.upper() in READ_METHODS


class FreshHubOAuth(HubOAuth):
    """HubOAuth whose cache serves only reads: for any other request ``get_user``
    asks the hub, so a revoked token is refused at once."""

    def get_user(self, handler, *, sync=True):
        if reads(handler.request.method):
            return super().get_user(handler, sync=sync)
        return self._call_coroutine(sync, self._fresh_user, handler)

    async def _fresh_user(self, handler):
        mark = _fresh.set(True)  # seen by user_for_token, in this task only
        try:
            return await super().get_user(handler, sync=False)
        finally:
            _fresh.reset(mark)

    def user_for_token(self, token, use_cache=True, session_id="", *, sync=True):
        return super().user_for_token(
            token, use_cache=use_cache and not _fresh.get(), session_id=session_id, sync=sync
        )


class AuthCacheConfig(Configurable):
    """The ``auth_cache_seconds`` setting and the HubOAuth built from it (both services)."""

    auth_cache_seconds = Integer(
        AUTH_CACHE_SECONDS,
        config=True,
        help="""Seconds the hub's answer for a token (or a page's login) is kept for reading
        requests: how long a token revoked at the hub (deleted, its server stopped) still
        reads. Requests that change something always ask the hub. JupyterHub's default
        is 300.""",
    )

    def make_hub_auth(self) -> FreshHubOAuth:
        """The service's HubOAuth (it reads JUPYTERHUB_* from the environment)."""
        return FreshHubOAuth(parent=self, cache_max_age=max(1, self.auth_cache_seconds))
