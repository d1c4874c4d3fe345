"""OAuthenticator 17's GenericOAuthenticator against the development IdP.

Checks the exact requests the hub will send (HTTP basic client auth, PKCE
verifier, IAM scopes) and that groups travel into auth_state and refresh.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from oauthenticator.generic import GenericOAuthenticator
from tornado import web


def _load_flow_helpers():
    # the browser-flow helpers of test_devidp.py, loaded by path so that this
    # works whatever pytest import mode the project picks
    name = "_labfleet_devidp_flow"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("test_devidp.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


flow = _load_flow_helpers()

pytestmark = pytest.mark.integration


@pytest.fixture
def idp(tmp_path):
    accounts = tmp_path / "accounts.yaml"
    shutil.copy(flow.ACCOUNTS, accounts)
    server = flow._start(tmp_path, accounts)
    yield server
    server.stop()


def _authenticator(idp, basic_auth=False) -> GenericOAuthenticator:
    return GenericOAuthenticator(
        basic_auth=basic_auth,
        client_id=flow.CLIENT_ID,
        client_secret=flow.CLIENT_SECRET,
        oauth_callback_url=flow.REDIRECT_URI,
        authorize_url=f"{idp.issuer}/authorize",
        token_url=f"{idp.issuer}/token",
        userdata_url=f"{idp.issuer}/userinfo",
        scope=flow.SCOPE.split(),
        username_claim="preferred_username",
        auth_state_groups_key="oauth_user.groups",
        manage_groups=True,
        allowed_groups={"ai-infn/users"},
        admin_groups={"ai-infn/admins"},
        enable_auth_state=True,
    )


async def _login(auth, idp, username, password):
    code, verifier, _ = flow.login(idp, username, password)
    params = {
        "code": code,
        "grant_type": "authorization_code",
        "redirect_uri": flow.REDIRECT_URI,
        "code_verifier": verifier,
    }
    # as OAuthenticator.build_access_tokens_request_params does
    if not auth.basic_auth:
        params.update(client_id=auth.client_id, client_secret=auth.client_secret)
    token_info = await auth.get_token_info(None, params)
    return token_info, await auth._token_to_auth_model(token_info)


@pytest.mark.parametrize("basic_auth", [False, True], ids=["secret-in-body", "basic-auth"])
async def test_generic_oauthenticator_login_groups_and_refresh(idp, basic_auth):
    auth = _authenticator(idp, basic_auth=basic_auth)

    token_info, model = await _login(auth, idp, "carol", "carol-pass")
    assert model["name"] == "carol"
    assert model["admin"] is True
    assert set(model["groups"]) == {"ai-infn/users", "ai-infn/admins", "ai-infn/ml"}
    state = model["auth_state"]
    assert state["refresh_token"]
    assert state["oauth_user"]["wlcg.groups"] == [
        "/ai-infn/users",
        "/ai-infn/admins",
        "/ai-infn/ml",
    ]
    assert await auth.check_allowed(model["name"], model)

    refreshed = await auth.get_token_info(
        None, auth.build_refresh_token_request_params(state["refresh_token"])
    )
    model2 = await auth._token_to_auth_model(refreshed)
    assert model2["name"] == "carol" and set(model2["groups"]) == set(model["groups"])


async def test_generic_oauthenticator_refuses_user_outside_allowed_groups(idp):
    auth = _authenticator(idp)
    _, model = await _login(auth, idp, "mallory", "mallory-pass")
    assert model["groups"] == ["other-org/users"]
    with pytest.raises(web.HTTPError) as exc:
        allowed = await auth.check_allowed(model["name"], model)
        assert not allowed  # older versions return False instead of raising
        raise web.HTTPError(403)
    assert exc.value.status_code == 403
