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
- each hub user bound to one identity-provider account, the ``sub`` of its
  first login (:mod:`labfleet_hub.subject_binding`);
- a browser whose sign-in can no longer be renewed is asked to log in again
  (:class:`labfleet_hub.refusal.LoginExpired`), never JupyterHub 6.1.1's 500;
- otherwise a drop-in ``GenericOAuthenticator``: OAuthenticator 17.4's own
  ``test_generic.py`` passes (``tests/unit/test_oauthenticator_suite.py``), its
  group settings and hooks are honoured, and the defaults that differ on
  purpose are listed in docs/identity.md;
- no token ever logged (:mod:`labfleet_hub.redact`).
"""

from __future__ import annotations

import json
import logging
import time

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.handlers.base import BaseHandler
from jupyterhub.handlers.login import LoginHandler, LogoutHandler
from jupyterhub.utils import maybe_future, url_path_join
from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.oauth2 import OAuthCallbackHandler, OAuthLoginHandler
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httputil import url_concat
from traitlets import Bool, Integer, List, Unicode, default

from . import redact, subject_binding
from .groups import map_iam_groups
from .refusal import LoginExpired, LoginRefused, Refusal, SubjectMismatch, login_refusal

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


class IAMCallbackHandler(OAuthCallbackHandler):
    """The OAuth callback: says why a login was refused, and binds the name to its ``sub``.

    ``get_authenticated_user`` answers None for a refused login, as JupyterHub
    and OAuthenticator expect; the reason the authenticator found
    (:meth:`IAMAuthenticator.authenticate`) is raised here, where it becomes
    the page. An allowed login is then checked against the account that owns
    the hub name (:mod:`labfleet_hub.subject_binding`) before any hub user is
    created or updated.
    """

    async def authenticate(self, data=None):
        auth_model = await super().authenticate(data)
        if auth_model is None:
            refusal = getattr(self, "_labfleet_refusal", None)
            if refusal is not None:
                raise LoginRefused(refusal)
            return None
        await self.authenticator.bind_subject(self.db, auth_model)
        return auth_model


class IAMAuthenticator(GenericOAuthenticator):
    """Log in with INDIGO IAM through OpenID Connect discovery, with IAM group mapping."""

    login_handler = IAMLoginHandler
    callback_handler = IAMCallbackHandler

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

    bind_subject_claim = Unicode(
        "sub",
        config=True,
        help="""The user-info claim that identifies an account for good (OpenID Connect's
        ``sub``). The first login of a hub user records it (table ``labfleet_subjects``
        in the hub's database); a later login of the same hub name with another value
        is refused (HTTP 403, "Account mismatch"). JupyterHub lowercases names, so
        without this IAM's ``Alice`` and ``alice`` would share one hub user, home and uid.
        Empty: no binding (not recommended).
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

    @default("auth_state_groups_key")
    def _default_auth_state_groups_key(self):
        # empty: groups from groups_claims, IAM's way; set (or claim_groups_key set, which
        # sets it): groups where it points, then the same mapping (prefix, valid names)
        return ""

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
        # with userdata_from_id_token the claims come from the ID token, and
        # OAuthenticator refuses every login that also has a userdata_url
        userinfo = document.get("userinfo_endpoint")
        if not self.userdata_url and userinfo and not self.userdata_from_id_token:
            self.userdata_url = userinfo
        self._discovered, self._discovered_at = document, time.monotonic()
        self.log.info("Discovered OpenID Connect endpoints of %s", self.issuer)
        return document

    async def authenticate(self, handler, data=None, **kwargs):
        await self.discover()
        auth_model = await super().authenticate(handler, data, **kwargs)
        if auth_model is not None:
            refusal = await self._login_refusal(auth_model)
            if refusal is not None and handler is not None:
                # JupyterHub refuses it (None); IAMCallbackHandler shows this reason
                handler._labfleet_refusal = refusal
        return auth_model

    # -- refusals -------------------------------------------------------------

    async def refusal(self, username: str, auth_model: dict, no_longer: bool = False) -> Refusal:
        """What a person refused for their groups is told (see :mod:`labfleet_hub.refusal`)."""
        claims, keys = await self._groups_source(auth_model.get("auth_state") or {})
        return login_refusal(
            username,
            claims,
            keys,
            self.allowed_groups,
            self.group_prefix,
            self.refusal_contact,
            no_longer=no_longer,
        )

    async def _login_refusal(self, auth_model: dict) -> Refusal | None:
        """The refusal of a login that JupyterHub will refuse for its groups, else None.

        The same checks as JupyterHub's ``get_authenticated_user``, run once
        more here because it drops the reason: it returns None and the callback
        shows a generic 403. Invalid and blocked names are left to it.
        """
        if self.allow_all:
            return None
        username = self.normalize_username(auth_model["name"])
        if not self.validate_username(username):
            return None
        if not await maybe_future(self.check_blocked_users(username, auth_model)):
            return None
        if await maybe_future(self.check_allowed(username, auth_model)):
            return None
        refusal = await self.refusal(username, auth_model)
        self.log.warning("Login refused: %s", refusal.text())
        return refusal

    async def _refuse_with_reason(self, auth_model: dict) -> None:
        """Raise :class:`LoginRefused` for a login that JupyterHub would refuse for its groups."""
        refusal = await self._login_refusal(auth_model)
        if refusal is not None:
            raise LoginRefused(refusal)

    # -- one account per hub user ---------------------------------------------

    async def bind_subject(self, db, auth_model: dict) -> None:
        """Bind the hub name to the account's ``sub`` at its first login; refuse another.

        Raises :class:`SubjectMismatch` (403) when the name belongs to another
        account and a 403 naming the claim when the identity provider sent none.
        """
        claim = self.bind_subject_claim
        if not claim:
            return
        name = auth_model["name"]
        user_info = (auth_model.get("auth_state") or {}).get(self.user_auth_state_key) or {}
        try:
            sub = subject_binding.check_subject(claim, user_info.get(claim))
        except subject_binding.InvalidSubject as e:
            self.log.warning("Login refused for %s: %s", name, e)
            raise web.HTTPError(403, f"Login refused: {e}".replace("%", "%%")) from None
        issuer = self.issuer or self.token_url
        bound = subject_binding.bind(db, name, sub, issuer)
        if bound == sub:
            return
        login_name = (
            user_info.get(self.username_claim) if isinstance(self.username_claim, str) else None
        )
        error = SubjectMismatch(name, str(login_name or name), sub, self.refusal_contact)
        self.log.warning("Login refused: %s (bound to subject %s)", error.jupyterhub_message, bound)
        raise error

    # -- groups ---------------------------------------------------------------

    async def _groups_source(self, auth_state: dict) -> tuple[dict, list[str]]:
        """Where the groups are read: ``(mapping, keys)`` for :func:`map_iam_groups`.

        IAM's claims (``groups_claims``) in the user info; or, when
        ``auth_state_groups_key`` is set (or the deprecated ``claim_groups_key``,
        which sets it), OAuthenticator's own lookup: a dotted path into the auth
        state (which ``modify_auth_state_hook`` may have filled) or a callable.
        """
        key = self.auth_state_groups_key
        if not key:
            return auth_state.get(self.user_auth_state_key) or {}, list(self.groups_claims)
        label = key if isinstance(key, str) else "auth_state_groups_key"
        found = await super().get_user_groups(auth_state)  # logs a missing or invalid key
        return {label: sorted(found, key=str)}, [label]

    async def get_user_groups(self, auth_state: dict) -> set[str]:
        claims, keys = await self._groups_source(auth_state)
        groups, dropped = map_iam_groups(claims, keys, self.group_prefix)
        for item in dropped:
            self.log.warning("Ignoring IAM group %s", item)
        return groups

    # -- tokens ---------------------------------------------------------------

    async def get_token_info(self, handler, params):
        """The token endpoint's answer, stamped with when its access token expires."""
        token_info = await super().get_token_info(handler, params)
        expires_in = token_info.get("expires_in")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            token_info["expires_at"] = time.time() + float(expires_in)
        return token_info

    def build_auth_state_dict(self, token_info, user_info):
        auth_state = super().build_auth_state_dict(token_info, user_info)
        # from the token endpoint's answer (get_token_info), so that reading userinfo
        # again with the same token does not make an old token look new
        if isinstance(token_info.get("expires_at"), int | float):
            auth_state["expires_at"] = float(token_info["expires_at"])
        return auth_state

    def _needs_refresh(self, auth_state: dict) -> bool:
        expires_at = auth_state.get("expires_at")
        return expires_at is not None and expires_at - time.time() < self.token_refresh_margin

    @staticmethod
    def _expired(auth_state: dict) -> bool:
        expires_at = auth_state.get("expires_at")
        return expires_at is not None and expires_at <= time.time()

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
        if not token_info.get("refresh_token"):
            token_info["refresh_token"] = refresh_token
        try:
            return await self._token_to_auth_model(token_info)
        except HTTPClientError as e:
            self.log.info("Fresh access token of %s refused (HTTP %s)", user.name, e.code)
            return False

    async def _reread_or_refresh(self, user, auth_state: dict):
        """The auth model from userinfo read with the current access token.

        Used while the token is valid for longer than ``token_refresh_margin``,
        and while a token without a refresh token (an identity provider that
        gives none, e.g. without ``offline_access``) has not expired yet. A
        token the identity provider refuses (4xx) falls back to the refresh
        token, as in OAuthenticator.
        """
        token_info = auth_state.get("token_response") or {
            "access_token": auth_state.get("access_token"),
            "token_type": "Bearer",
        }
        try:
            return await self._token_to_auth_model(token_info)
        except HTTPClientError as e:
            if not 400 <= e.code < 500:
                raise
            self.log.info("Access token of %s refused (HTTP %s)", user.name, e.code)
        return await self.refresh_tokens(user, auth_state)

    async def _refresh(self, user, handler):
        """OAuthenticator's ``refresh_user`` contract, refreshing before expiry."""
        if not self.enable_auth_state:
            return True  # nothing to refresh with (as OAuthenticator)
        await self.discover()
        auth_state = await user.get_auth_state()
        if self.refresh_user_hook is not None:
            refreshed = await self._call_refresh_user_hook(user, auth_state)
            if refreshed is not None:
                return refreshed
        if not auth_state:
            self.log.info("No auth_state for %s: a new login is required", user.name)
            return False
        if self._needs_refresh(auth_state) and auth_state.get("refresh_token"):
            auth_model = await self.refresh_tokens(user, auth_state)
        elif self._expired(auth_state):
            self.log.info("Access token of %s expired and cannot be refreshed", user.name)
            return False
        else:
            auth_model = await self._reread_or_refresh(user, auth_state)
        return auth_model or False

    async def refresh_user(self, user, handler=None, **kwargs):
        """Fresh tokens and fresh groups; refuse users who left every allowed group.

        The ``refresh_user_hook`` is asked first, always. A browser whose sign-in
        can no longer be renewed is told to log in again (:class:`LoginExpired`)
        instead of JupyterHub's 500.
        """
        auth_model = await self._refresh(user, handler)
        if isinstance(auth_model, dict):
            allowed = await self.check_allowed(auth_model["name"], auth_model)
            if not allowed:
                refusal = await self.refusal(user.name, auth_model, no_longer=True)
                self.log.warning("Spawn refused: %s", refusal.text())
                raise LoginRefused(refusal)
        elif auth_model is False:
            self._login_again(user, handler)
        return auth_model

    def _login_again(self, user, handler) -> None:
        """A refresh failed: make JupyterHub 6.1 ask for a new login, never answer 500.

        JupyterHub's ``refresh_auth`` reads ``handler._token_authenticated``, which
        only a request with a token sets: a browser (cookie) request got an
        AttributeError, i.e. HTTP 500 (the spawn's forced refresh) or a logged
        traceback (the periodic refresh). The attribute is set to False here.
        A page of the user's own that asked for the refresh itself (the spawn
        form) then says that the sign-in expired, with a link to log in again,
        and the hub's login cookie is cleared. The periodic refresh, the login,
        logout and callback pages and the REST API get JupyterHub's own
        handling: the user counts as logged out (the page goes to the login),
        or the API answers 403.
        """
        self.log.warning("Sign-in of %s expired and cannot be renewed", user.name)
        if not isinstance(handler, BaseHandler):
            return
        if not hasattr(handler, "_token_authenticated"):
            handler._token_authenticated = False
        if handler._token_authenticated:
            return
        if isinstance(handler, LoginHandler | LogoutHandler | OAuthCallbackHandler | APIHandler):
            return
        if not hasattr(handler, "parsed_scopes"):
            # JupyterHub's periodic refresh (auth_refresh_age), run while it identifies
            # the user (prepare, before the scopes): an exception there is only logged,
            # False makes the user count as logged out and the page go to the login
            return
        current = getattr(handler, "_jupyterhub_user", None)
        if current is None or getattr(current, "name", None) != user.name:
            return  # someone else's (an admin's) request: JupyterHub decides
        self.log.info("Asking %s to log in again", user.name)
        # back to the page after the login; a form's POST comes back as its page, without
        # the form's query (a GET /hub/spawn with arguments would spawn with them)
        request = handler.request
        back = request.uri if request.method in ("GET", "HEAD") else request.path
        login_url = url_concat(handler.settings["login_url"], {"next": back})
        handler.clear_login_cookie()
        raise LoginExpired(user.name, self.login_service, login_url)

    async def fresh_access_token(self, user) -> dict:
        """A currently valid access token for ``user`` (refreshed if needed), for notebooks."""
        await self.discover()
        auth_state = await user.get_auth_state() or {}
        if not auth_state.get("access_token"):
            raise web.HTTPError(409, f"{user.name} has no IAM token; log in again")
        if self._needs_refresh(auth_state) and auth_state.get("refresh_token"):
            auth_model = await self.refresh_tokens(user, auth_state)
            if not auth_model:
                raise web.HTTPError(401, f"the IAM session of {user.name} expired; log in again")
            auth_state = auth_model["auth_state"]
            await user.save_auth_state(auth_state)
        elif self._expired(auth_state):
            raise web.HTTPError(401, f"the IAM session of {user.name} expired; log in again")
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
