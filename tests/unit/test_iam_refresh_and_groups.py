"""IAMAuthenticator's refresh, group settings and discovery, on OAuthenticator's mock IdP.

The identity provider is OAuthenticator 17.4's own mock (``oauthenticator.tests.mocks``:
real token and userinfo exchanges over a fake HTTP client, no network).
"""

from __future__ import annotations

import time

import jwt
import pytest
from labfleet_hub.authenticator import IAMAuthenticator
from oauthenticator.tests.conftest import client  # noqa: F401  (upstream's fixture)
from oauthenticator.tests.mocks import setup_oauth_mock

HOST = "iam.example.org"
ISSUER = f"https://{HOST}/"


@pytest.fixture
def idp(client):  # noqa: F811
    setup_oauth_mock(client, host=HOST, access_token_path="/token", user_path="/userinfo")
    client.add_host(
        HOST,
        [
            *client.hosts[HOST],
            (
                "/.well-known/openid-configuration",
                lambda request: {
                    "issuer": ISSUER,
                    "authorization_endpoint": f"{ISSUER}authorize",
                    "token_endpoint": f"{ISSUER}token",
                    "userinfo_endpoint": f"{ISSUER}userinfo",
                },
            ),
        ],
    )
    return client


def claims(name="alice", **extra):
    return {"sub": f"sub-{name}", "preferred_username": name, "groups": ["ai-infn/users"], **extra}


def make(idp, **kw):
    kw.setdefault("allowed_groups", {"users"})
    return IAMAuthenticator(
        issuer=ISSUER, client_id="hub", group_prefix="ai-infn/", http_client=idp, **kw
    )


class User:
    def __init__(self, model):
        self.name = model["name"]
        self.auth_state = model["auth_state"]

    async def get_auth_state(self):
        return self.auth_state

    async def save_auth_state(self, auth_state):
        self.auth_state = auth_state


async def login(auth, idp, userinfo):
    handler = idp.handler_for_user(userinfo)
    return await auth.get_authenticated_user(handler, None), handler


# -- refresh ------------------------------------------------------------------


async def test_token_shorter_than_margin_without_refresh_token_is_reread(idp):
    # an IdP without offline_access: no refresh token, and a token that lives no
    # longer than token_refresh_margin. Before: refresh_user was False right after login.
    idp.enable_refresh_tokens = False
    auth = make(idp, token_refresh_margin=3600)
    info = claims()
    model, handler = await login(auth, idp, info)
    assert model["auth_state"]["refresh_token"] is None
    user = User(model)
    user.auth_state["expires_at"] = time.time() + 600  # < margin, not expired
    info["groups"] = ["ai-infn/users", "ai-infn/ml"]
    refreshed = await auth.refresh_user(user, handler)
    assert refreshed["groups"] == ["ml", "users"]
    assert refreshed["auth_state"]["access_token"] == model["auth_state"]["access_token"]
    # the notebook token endpoint hands out the still-valid token too
    token = await auth.fresh_access_token(user)
    assert token["access_token"] == model["auth_state"]["access_token"]


async def test_expired_token_without_refresh_token_needs_login(idp):
    idp.enable_refresh_tokens = False
    auth = make(idp)
    model, handler = await login(auth, idp, claims())
    user = User(model)
    user.auth_state["expires_at"] = time.time() - 1
    assert await auth.refresh_user(user, handler) is False
    with pytest.raises(Exception, match="expired; log in again"):
        await auth.fresh_access_token(user)


async def test_revoked_token_without_refresh_token_needs_login(idp):
    idp.enable_refresh_tokens = False
    auth = make(idp)
    model, handler = await login(auth, idp, claims())
    idp.access_tokens.pop(model["auth_state"]["access_token"])  # the IdP forgets it
    assert await auth.refresh_user(User(model), handler) is False


async def test_near_expiry_uses_refresh_token(idp):
    idp.enable_refresh_tokens = True
    auth = make(idp)
    model, handler = await login(auth, idp, claims())
    user = User(model)
    user.auth_state["expires_at"] = time.time() + 10
    refreshed = await auth.refresh_user(user, handler)
    assert refreshed["auth_state"]["access_token"] != model["auth_state"]["access_token"]
    assert refreshed["auth_state"]["refresh_token"]


async def test_rereading_userinfo_keeps_the_token_expiry(idp):
    # the token endpoint's expires_in is stamped once: re-reading userinfo with the
    # same token must not make it look new (it would never be refreshed early)
    idp.enable_refresh_tokens = False
    auth = make(idp)
    model, handler = await login(auth, idp, claims())
    model["auth_state"]["token_response"]["expires_at"] = time.time() + 900
    model["auth_state"]["expires_at"] = time.time() + 900
    refreshed = await auth.refresh_user(User(model), handler)
    assert (
        refreshed["auth_state"]["expires_at"] == model["auth_state"]["token_response"]["expires_at"]
    )


@pytest.mark.parametrize("answer", [True, False])
async def test_refresh_user_hook_is_asked_near_expiry(idp, answer):
    calls = []

    def hook(authenticator, user, auth_state):
        calls.append(auth_state["access_token"])
        return answer

    auth = make(idp, refresh_user_hook=hook)
    model, handler = await login(auth, idp, claims())
    user = User(model)
    user.auth_state["expires_at"] = time.time() + 10  # within token_refresh_margin
    assert await auth.refresh_user(user, handler) is answer
    assert calls == [model["auth_state"]["access_token"]]


async def test_refresh_user_hook_none_goes_on_refreshing(idp):
    idp.enable_refresh_tokens = True
    auth = make(idp, refresh_user_hook=lambda a, u, s: None)
    model, handler = await login(auth, idp, claims())
    user = User(model)
    user.auth_state["expires_at"] = time.time() + 10
    refreshed = await auth.refresh_user(user, handler)
    assert refreshed["auth_state"]["access_token"] != model["auth_state"]["access_token"]


# -- group settings inherited from OAuthenticator -----------------------------


async def test_auth_state_groups_key_nested_is_honoured_and_mapped(idp):
    auth = make(idp, auth_state_groups_key="oauth_user.org.teams", admin_groups={"admins"})
    info = claims(org={"teams": ["ai-infn/users", "ai-infn/admins", "other/x", "ai-infn/Bad Name"]})
    model, _ = await login(auth, idp, info)
    # from the key, not from the groups claim; the same prefix and name rules as IAM's
    assert model["groups"] == ["admins", "users"]
    assert model["admin"] is True


async def test_claim_groups_key_callable_is_honoured(idp):
    auth = make(idp, claim_groups_key=lambda user_info: user_info["roles"]["hub"])
    model, _ = await login(auth, idp, claims(groups=[], roles={"hub": ["ai-infn/users"]}))
    assert model["groups"] == ["users"]


async def test_groups_from_modify_auth_state_hook(idp):
    def hook(authenticator, auth_state):
        auth_state["extra_groups"] = ["ai-infn/users", "ai-infn/ml"]
        return auth_state

    auth = make(idp, modify_auth_state_hook=hook, auth_state_groups_key="extra_groups")
    model, _ = await login(auth, idp, claims(groups=[]))
    assert model["groups"] == ["ml", "users"]


async def test_refusal_lists_groups_from_the_configured_key(idp):
    auth = make(idp, auth_state_groups_key="oauth_user.teams")
    model, handler = await login(auth, idp, claims(teams=["ai-infn/guests"]))
    assert model is None  # refused, as JupyterHub expects: None
    refusal = handler._labfleet_refusal  # shown by IAMCallbackHandler
    assert refusal.user_groups == ("ai-infn/guests",)
    assert refusal.allowed_groups == ("ai-infn/users",)


async def test_missing_groups_key_is_logged_and_refused(idp, caplog):
    auth = make(idp, auth_state_groups_key="oauth_user.nowhere")
    model, _ = await login(auth, idp, claims())
    assert model is None
    assert "auth_state_groups_key oauth_user.nowhere does not exist" in caplog.text


# -- discovery ----------------------------------------------------------------


async def test_issuer_with_userdata_from_id_token_logs_in(idp):
    # before: discovery filled userdata_url and every login was a 500 ("Cannot specify both")
    auth = make(idp, userdata_from_id_token=True)
    await auth.discover()
    assert auth.userdata_url == "" and auth.token_url == f"{ISSUER}token"
    id_token = jwt.encode(claims("bob", aud="hub"), key="k")
    model, _ = await login(auth, idp, {"id_token": id_token})
    assert model["name"] == "bob" and model["groups"] == ["users"]


async def test_explicit_userdata_url_still_wins_over_discovery(idp):
    auth = make(idp, userdata_url=f"{ISSUER}other")
    await auth.discover()
    assert auth.userdata_url == f"{ISSUER}other"
