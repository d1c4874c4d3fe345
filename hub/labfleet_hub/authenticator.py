"""IAMAuthenticator: OpenID Connect login against INDIGO IAM (or any OIDC issuer).

What it adds to OAuthenticator's ``GenericOAuthenticator``:

- one setting, :attr:`IAMAuthenticator.issuer`: the endpoints come from the
  issuer's discovery document, fetched when first needed (never at import or
  start-up, so a hub whose identity provider is down still starts and shows a
  clear error page instead of crashing);
- groups from the ``groups`` and/or ``wlcg.groups`` claims, mapped to hub
  groups through :func:`labfleet_hub.groups.map_iam_groups`;
- a refused login says why and whom to ask (:mod:`labfleet_hub.refusal`):
  the allowed groups, the person's groups and :attr:`IAMAuthenticator.refusal_contact`;
- membership and token freshness re-checked before every spawn: the access
  token is refreshed when it is about to expire, the user info is read again,
  and a user no longer in an allowed group cannot start a server;
- a token endpoint (:mod:`labfleet_hub.tokens`) from which code in a notebook
  gets a fresh access token;
- no token ever logged (:mod:`labfleet_hub.redact`).
"""

from __future__ import annotations

import json
import logging
import time

from jupyterhub.utils import maybe_future, url_path_join
from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.oauth2 import OAuthLoginHandler
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Bool, Integer, List, Unicode, default

from . import redact
from .groups import map_iam_groups
from .refusal import LoginRefused, Refusal, login_refusal

DEFAULT_SCOPES = ["openid", "profile", "email", "offline_access", "wlcg", "wlcg.groups"]


class IdentityProviderUnavailable(web.HTTPError):
    """The identity provider cannot be reached or answered nonsense (HTTP 503)."""

    def __init__(self, issuer: str, reason: str):
        message = (
            f"The identity provider ({issuer}) cannot be reached right now: {reason}. "
            "Please try again in a few minutes; if it persists, tell the platform admins."
        )
        # JupyterHub's error page shows log_message % args: escape any '%'
        super().__init__(
            503, log_message=message.replace("%", "%%"), reason="Identity provider unavailable"
        )
        self.message = message

    def __str__(self):
        return self.message


class IAMLoginHandler(OAuthLoginHandler):
    """Discover the endpoints (once, cached) before redirecting to the provider."""

    async def get(self):
        await self.authenticator.discover()
        super().get()


class IAMAuthenticator(GenericOAuthenticator):
    """Log in with INDIGO IAM through OpenID Connect discovery, with IAM group mapping."""

    login_handler = IAMLoginHandler

    issuer = Unicode(
        "",
        config=True,
        help="""The OpenID Connect issuer URL, e.g. ``https://iam.example.org/``.

        authorize_url, token_url and userdata_url are read from
        ``<issuer>/.well-known/openid-configuration`` unless set explicitly.
        """,
    )

    discovery_ttl = Integer(
        3600,
        config=True,
        help="Seconds to keep the discovery document before fetching it again.",
    )

    discovery_timeout = Integer(
        10,
        config=True,
        help="Seconds to wait for the identity provider's discovery document.",
    )

    groups_claims = List(
        Unicode(),
        ["groups", "wlcg.groups"],
        config=True,
        help="""User-info claims that hold group names, read in this order and merged.

        IAM sends ``groups`` (``ai-infn/users``) and, with scope ``wlcg.groups``,
        ``wlcg.groups`` (``/ai-infn/users``); the leading ``/`` is stripped.
        """,
    )

    group_prefix = Unicode(
        "",
        config=True,
        help="""Only IAM groups starting with this prefix become hub groups, without it.

        With ``ai-infn/``, ``ai-infn/ml`` becomes hub group ``ml`` and
        ``other-vo/x`` is ignored. Empty: every group, as sent.
        """,
    )

    token_refresh_margin = Integer(
        300,
        config=True,
        help="""Refresh the access token when it expires within this many seconds.

        Checked on every refresh (before every spawn and every auth_refresh_age).
        """,
    )

    refusal_contact = Unicode(
        "",
        config=True,
        help="""Whom a person refused at login should ask for access, shown on the refusal
        page with the groups allowed here: an e-mail address or a URL (shown as a link)
        or any text, e.g. ``the AI_INFN support team, ai-infn-support@example.org``.

        Empty: "the platform's administrators".
        """,
    )

    notebook_token_endpoint = Bool(
        True,
        config=True,
        help="""Serve ``/hub/api/labfleet/iam-token/<user>`` so notebooks can get a fresh
        IAM access token with their JupyterHub API token (scope
        ``custom:labfleet:iam-token``).
        """,
    )

    @default("scope")
    def _default_scope(self):
        return list(DEFAULT_SCOPES)

    @default("login_service")
    def _default_login_service(self):
        return "INDIGO IAM"

    @default("username_claim")
    def _default_username_claim(self):
        return "preferred_username"

    @default("manage_groups")
    def _default_manage_groups(self):
        return True

    @default("enable_auth_state")
    def _default_enable_auth_state(self):
        return True

    @default("refresh_pre_spawn")
    def _default_refresh_pre_spawn(self):
        return True

    @default("auth_refresh_age")
    def _default_auth_refresh_age(self):
        return 300

    @default("enable_pkce")
    def _default_enable_pkce(self):
        return True

    _discovered: dict | None = None
    _discovered_at: float = 0.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        redact.install(logging.getLogger(), (self.client_secret,))
        redact.install(self.log, (self.client_secret,))

    # -- discovery ------------------------------------------------------------

    @property
    def discovery_url(self) -> str:
        return url_path_join(self.issuer.rstrip("/") + "/", ".well-known/openid-configuration")

    async def discover(self, force: bool = False) -> dict:
        """Fetch (or reuse) the discovery document and fill the endpoint settings."""
        if not self.issuer:
            return {}
        fresh = time.monotonic() - self._discovered_at < self.discovery_ttl
        if self._discovered is not None and fresh and not force:
            return self._discovered
        client = AsyncHTTPClient()
        request = HTTPRequest(
            self.discovery_url,
            connect_timeout=self.discovery_timeout,
            request_timeout=self.discovery_timeout,
            validate_cert=self.validate_server_cert,
        )
        try:
            response = await client.fetch(request)
            document = json.loads(response.body)
        except HTTPClientError as e:
            raise IdentityProviderUnavailable(
                self.issuer, f"discovery answered HTTP {e.code}"
            ) from None
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise IdentityProviderUnavailable(self.issuer, reason) from None
        missing = [k for k in ("authorization_endpoint", "token_endpoint") if k not in document]
        if missing:
            raise IdentityProviderUnavailable(
                self.issuer, f"discovery document lacks {', '.join(missing)}"
            )
        # explicit settings win over discovery
        if not self.authorize_url:
            self.authorize_url = document["authorization_endpoint"]
        if not self.token_url:
            self.token_url = document["token_endpoint"]
        if not self.userdata_url and document.get("userinfo_endpoint"):
            self.userdata_url = document["userinfo_endpoint"]
        self._discovered, self._discovered_at = document, time.monotonic()
        self.log.info("Discovered OpenID Connect endpoints of %s", self.issuer)
        return document

    async def authenticate(self, handler, data=None, **kwargs):
        await self.discover()
        auth_model = await super().authenticate(handler, data, **kwargs)
        if auth_model is not None:
            await self._refuse_with_reason(auth_model)
        return auth_model

    # -- refusals -------------------------------------------------------------

    def refusal(self, username: str, auth_model: dict, no_longer: bool = False) -> Refusal:
        """What a person refused for their groups is told (see :mod:`labfleet_hub.refusal`)."""
        claims = (auth_model.get("auth_state") or {}).get(self.user_auth_state_key) or {}
        return login_refusal(
            username,
            claims,
            self.groups_claims,
            self.allowed_groups,
            self.group_prefix,
            self.refusal_contact,
            no_longer=no_longer,
        )

    async def _refuse_with_reason(self, auth_model: dict) -> None:
        """Raise :class:`LoginRefused` for a login that JupyterHub would refuse for its groups.

        The same checks as JupyterHub's ``get_authenticated_user``, run once
        more here because it drops the reason: it returns None and the callback
        shows a generic 403. Invalid and blocked names are left to it.
        """
        if self.allow_all:
            return
        username = self.normalize_username(auth_model["name"])
        if not self.validate_username(username):
            return
        if not await maybe_future(self.check_blocked_users(username, auth_model)):
            return
        if await maybe_future(self.check_allowed(username, auth_model)):
            return
        refusal = self.refusal(username, auth_model)
        self.log.warning("Login refused: %s", refusal.text())
        raise LoginRefused(refusal)

    # -- groups ---------------------------------------------------------------

    async def get_user_groups(self, auth_state: dict) -> set[str]:
        claims = auth_state.get(self.user_auth_state_key) or {}
        groups, dropped = map_iam_groups(claims, self.groups_claims, self.group_prefix)
        for item in dropped:
            self.log.warning("Ignoring IAM group %s", item)
        return groups

    # -- tokens ---------------------------------------------------------------

    def build_auth_state_dict(self, token_info, user_info):
        auth_state = super().build_auth_state_dict(token_info, user_info)
        expires_in = token_info.get("expires_in")
        if isinstance(expires_in, int | float):
            auth_state["expires_at"] = time.time() + float(expires_in)
        return auth_state

    def _needs_refresh(self, auth_state: dict) -> bool:
        expires_at = auth_state.get("expires_at")
        return expires_at is not None and expires_at - time.time() < self.token_refresh_margin

    async def refresh_tokens(self, user, auth_state: dict):
        """Use the refresh token now; returns the new auth model or False."""
        refresh_token = auth_state.get("refresh_token")
        if not refresh_token:
            return False
        params = self.build_refresh_token_request_params(refresh_token)
        try:
            token_info = await self.get_token_info(None, params)
        except Exception as e:
            self.log.info(
                "Refresh token of %s refused (%s); a new login is required",
                user.name,
                type(e).__name__,
            )
            return False
        token_info.setdefault("refresh_token", refresh_token)
        return await self._token_to_auth_model(token_info)

    async def refresh_user(self, user, handler=None, **kwargs):
        """Fresh tokens and fresh groups; refuse users who left every allowed group."""
        await self.discover()
        auth_state = await user.get_auth_state() or {}
        if auth_state and self._needs_refresh(auth_state):
            auth_model = await self.refresh_tokens(user, auth_state)
        else:
            auth_model = await super().refresh_user(user, handler, **kwargs)
        if isinstance(auth_model, dict):
            allowed = await self.check_allowed(auth_model["name"], auth_model)
            if not allowed:
                refusal = self.refusal(user.name, auth_model, no_longer=True)
                self.log.warning("Spawn refused: %s", refusal.text())
                raise LoginRefused(refusal)
        return auth_model

    async def fresh_access_token(self, user) -> dict:
        """A currently valid access token for ``user`` (refreshed if needed), for notebooks."""
        await self.discover()
        auth_state = await user.get_auth_state() or {}
        if not auth_state.get("access_token"):
            raise web.HTTPError(409, f"{user.name} has no IAM token; log in again")
        if self._needs_refresh(auth_state):
            auth_model = await self.refresh_tokens(user, auth_state)
            if not auth_model:
                raise web.HTTPError(401, f"the IAM session of {user.name} expired; log in again")
            auth_state = auth_model["auth_state"]
            await user.save_auth_state(auth_state)
        return {
            "access_token": auth_state["access_token"],
            "token_type": "Bearer",
            "expires_at": auth_state.get("expires_at"),
            "scope": auth_state.get("scope"),
        }

    # -- handlers and spawn-time hygiene --------------------------------------

    def get_handlers(self, app):
        handlers = list(super().get_handlers(app))
        from .api_handlers import IAM_TOKEN_HANDLERS, POSIX_IDS_HANDLERS

        if self.notebook_token_endpoint:
            handlers += IAM_TOKEN_HANDLERS
        # services that act as a user's notebook (batch Jobs) read its uid/gids here
        return [*handlers, *POSIX_IDS_HANDLERS]

    async def pre_spawn_start(self, user, spawner):
        """Never hand the client secret to a notebook, whatever env_keep says."""
        for key in list(spawner.environment):
            if self.client_secret and spawner.environment.get(key) == self.client_secret:
                spawner.environment.pop(key)
        if "OAUTH_CLIENT_SECRET" in spawner.env_keep:
            spawner.env_keep = [k for k in spawner.env_keep if k != "OAUTH_CLIENT_SECRET"]
