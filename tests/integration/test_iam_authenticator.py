"""IAMAuthenticator against the real development identity provider.

The hub user is a small stand-in (auth state kept in memory); discovery,
token exchange, refresh and userinfo are real OpenID Connect requests.
"""

from __future__ import annotations

import shutil
import time

import pytest
import yaml
from labfleet_hub.authenticator import IAMAuthenticator, IdentityProviderUnavailable
from labfleet_hub.configurer import devidp_withheld_groups, load_values
from labfleet_hub.refusal import LoginRefused
from tornado import web

from tests.conftest import free_port

from .test_devidp_oauthenticator import flow


class HubUser:
    def __init__(self, name, auth_state):
        self.name = name
        self._auth_state = auth_state

    async def get_auth_state(self):
        return self._auth_state

    async def save_auth_state(self, auth_state):
        self._auth_state = auth_state


@pytest.fixture
def idp(tmp_path):
    accounts = tmp_path / "accounts.yaml"
    shutil.copy(flow.ACCOUNTS, accounts)
    server = flow._start(tmp_path, accounts)
    server.accounts = accounts
    yield server
    server.stop()


def make_authenticator(issuer, **kw):
    return IAMAuthenticator(
        issuer=issuer,
        client_id=flow.CLIENT_ID,
        client_secret=flow.CLIENT_SECRET,
        oauth_callback_url=flow.REDIRECT_URI,
        group_prefix="ai-infn/",
        allowed_groups={"users"},
        admin_groups={"admins"},
        **kw,
    )


async def login(auth, idp, username, scope=flow.SCOPE):
    await auth.discover()
    code, verifier, _ = flow.login(idp, username, f"{username}-pass", scope=scope)
    params = {
        "code": code,
        "grant_type": "authorization_code",
        "redirect_uri": flow.REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": auth.client_id,
        "client_secret": auth.client_secret,
    }
    token_info = await auth.get_token_info(None, params)
    return await auth._token_to_auth_model(token_info)


def set_groups(idp, username, groups):
    data = yaml.safe_load(idp.accounts.read_text())
    for user in data["users"]:
        if user["username"] == username:
            user["groups"] = groups
    idp.accounts.write_text(yaml.safe_dump(data))
    idp.reload_accounts()


async def test_discovery_fills_endpoints_and_scopes(idp):
    auth = make_authenticator(idp.issuer + "/")
    assert not auth.token_url
    await auth.discover()
    assert auth.authorize_url == f"{idp.issuer}/authorize"
    assert auth.token_url == f"{idp.issuer}/token"
    assert auth.userdata_url == f"{idp.issuer}/userinfo"
    assert auth.scope == ["openid", "profile", "email", "offline_access", "wlcg", "wlcg.groups"]
    assert auth.enable_pkce and auth.manage_groups and auth.refresh_pre_spawn


async def test_login_maps_groups_and_admin(idp):
    auth = make_authenticator(idp.issuer)
    model = await login(auth, idp, "carol")
    assert model["name"] == "carol"
    assert set(model["groups"]) == {"users", "admins", "ml"}
    assert model["admin"] is True
    assert model["auth_state"]["expires_at"] > time.time()
    model = await login(auth, idp, "alice")
    assert set(model["groups"]) == {"users", "ml"} and not model["admin"]
    assert await auth.check_allowed("alice", model)
    model = await login(auth, idp, "mallory")
    assert model["groups"] == []
    assert not await auth.check_allowed("mallory", model)


async def test_bundled_configuration_makes_no_demo_admin(tmp_path):
    # issue 10: carol (a public demo password) was a hub admin in the default configuration
    values = load_values(flow.REPO / "config" / "labfleet.yaml")
    assert values["devidp"]["enabled"] and not values["devidp"]["demo_admin"]
    withheld = devidp_withheld_groups(values)
    assert withheld == ["ai-infn/admins"]
    accounts = tmp_path / "accounts.yaml"
    shutil.copy(flow.ACCOUNTS, accounts)
    server = flow._start(tmp_path, accounts, withhold_groups=withheld)
    try:
        assert values["iam"]["admin_groups"] == ["admins"]  # as make_authenticator's
        auth = make_authenticator(server.issuer)
        model = await login(auth, server, "carol")
        assert set(model["groups"]) == {"users", "ml"}
        # False, not None: a carol who was an admin before is no longer one
        assert model["admin"] is False
    finally:
        server.stop()
    # asked for explicitly: carol is the accounts file's admin again
    assert (
        devidp_withheld_groups({**values, "devidp": {**values["devidp"], "demo_admin": True}}) == []
    )


async def test_refused_login_says_which_groups_are_allowed_and_whom_to_ask(idp):
    auth = make_authenticator(idp.issuer, refusal_contact="support@example.org")
    await auth._refuse_with_reason(await login(auth, idp, "alice"))  # allowed: no error
    model = await login(auth, idp, "mallory")
    with pytest.raises(LoginRefused) as info:
        await auth._refuse_with_reason(model)
    refusal = info.value.refusal
    assert info.value.status_code == 403
    assert refusal.allowed_groups == ("ai-infn/users",)
    assert refusal.user_groups == ("other-org/users",)
    assert refusal.contact_href == "mailto:support@example.org"
    # with no group rule at all, nobody is refused for their groups
    everyone = make_authenticator(idp.issuer)
    everyone.allowed_groups = set()
    everyone.allow_all = True
    await everyone._refuse_with_reason(model)


async def test_refresh_uses_refresh_token_when_expiring_and_rereads_groups(idp):
    auth = make_authenticator(idp.issuer)
    model = await login(auth, idp, "bob")
    user = HubUser("bob", model["auth_state"])
    old_token = model["auth_state"]["access_token"]
    set_groups(idp, "bob", ["ai-infn/users", "ai-infn/fpga"])
    # pretend the access token is about to expire: the refresh token must be used
    user._auth_state["expires_at"] = time.time() + 10
    refreshed = await auth.refresh_user(user)
    assert refreshed["auth_state"]["access_token"] != old_token
    assert set(refreshed["groups"]) == {"users", "fpga"}


async def test_refresh_refuses_user_removed_from_allowed_groups(idp):
    auth = make_authenticator(idp.issuer)
    model = await login(auth, idp, "alice")
    user = HubUser("alice", model["auth_state"])
    set_groups(idp, "alice", ["other-org/users"])
    with pytest.raises(web.HTTPError) as info:
        await auth.refresh_user(user)
    assert info.value.status_code == 403
    assert "no longer a member of a group allowed" in info.value.log_message
    assert isinstance(info.value, LoginRefused)
    assert info.value.refusal.allowed_groups == ("ai-infn/users",)


async def test_fresh_access_token_refreshes_and_saves(idp):
    auth = make_authenticator(idp.issuer)
    model = await login(auth, idp, "alice")
    user = HubUser("alice", model["auth_state"])
    same = await auth.fresh_access_token(user)
    assert same["access_token"] == model["auth_state"]["access_token"]
    user._auth_state["expires_at"] = time.time()
    fresh = await auth.fresh_access_token(user)
    assert fresh["access_token"] != same["access_token"]
    assert user._auth_state["access_token"] == fresh["access_token"]
    assert "refresh_token" not in fresh


async def test_unreachable_issuer_is_a_clear_503():
    auth = make_authenticator(f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(IdentityProviderUnavailable) as info:
        await auth.discover()
    assert info.value.status_code == 503
    assert "cannot be reached right now" in str(info.value)


#: What an identity provider without offline_access (or a client not allowed it) grants.
NO_OFFLINE = "openid profile email wlcg wlcg.groups"


async def test_issuer_with_userdata_from_id_token_logs_in(idp):
    # issue 10: discovery filled userdata_url and OAuthenticator then answered every
    # login with a 500 ("Cannot specify both ... userdata_from_id_token")
    auth = make_authenticator(idp.issuer, userdata_from_id_token=True)
    await auth.discover()
    assert auth.userdata_url == ""
    model = await login(auth, idp, "alice")
    assert model["name"] == "alice"
    assert set(model["groups"]) == {"users", "ml"}
    assert model["auth_state"]["oauth_user"]["sub"]  # the ID token's claims


async def test_token_within_margin_without_refresh_token_keeps_working(idp):
    # issue 10: a token living no longer than token_refresh_margin and no refresh token:
    # refresh_user was False right after login, so every spawn was refused
    auth = make_authenticator(idp.issuer, token_refresh_margin=7200)  # > the IdP's 3600 s
    model = await login(auth, idp, "bob", scope=NO_OFFLINE)
    assert model["auth_state"]["refresh_token"] is None
    user = HubUser("bob", model["auth_state"])
    set_groups(idp, "bob", ["ai-infn/users", "ai-infn/fpga"])
    refreshed = await auth.refresh_user(user)
    assert refreshed, "a valid token without a refresh token must not force a new login"
    assert set(refreshed["groups"]) == {"users", "fpga"}  # userinfo read with it
    assert (await auth.fresh_access_token(user))["access_token"] == model["auth_state"][
        "access_token"
    ]


async def test_expired_token_without_refresh_token_needs_new_login(tmp_path):
    accounts = tmp_path / "accounts.yaml"
    shutil.copy(flow.ACCOUNTS, accounts)
    server = flow._start(tmp_path, accounts, access_token_ttl=2)
    try:
        auth = make_authenticator(server.issuer)
        model = await login(auth, server, "alice", scope=NO_OFFLINE)
        user = HubUser("alice", model["auth_state"])
        assert await auth.refresh_user(user)  # still valid: userinfo read with it
        time.sleep(3)
        assert await auth.refresh_user(user) is False
        # pretend the hub's clock lags: the IdP refuses the token, still no refresh token
        user._auth_state["expires_at"] = time.time() + 3600
        assert await auth.refresh_user(user) is False
    finally:
        server.stop()


async def test_refresh_user_hook_is_asked_when_the_token_is_near_expiry(idp):
    seen = []

    async def hook(authenticator, user, auth_state):
        seen.append(auth_state["access_token"])
        return True  # e.g. "this IdP's sessions are checked elsewhere"

    auth = make_authenticator(idp.issuer, refresh_user_hook=hook)
    model = await login(auth, idp, "alice")
    user = HubUser("alice", model["auth_state"])
    user._auth_state["expires_at"] = time.time() + 10  # within token_refresh_margin
    assert await auth.refresh_user(user) is True
    assert seen == [model["auth_state"]["access_token"]]
