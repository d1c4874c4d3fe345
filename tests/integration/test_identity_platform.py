"""Identity on the real platform: `labfleet up`, the development IdP, the hub, Chromium.

- One IAM account per hub user: accounts differing only in case (JupyterHub
  lowercases names), and an account recreated with a new ``sub``.
- An identity provider that gives no refresh token: spawns work while the
  token lives (even if it lives no longer than ``token_refresh_margin``), and a
  sign-in that can no longer be renewed asks to log in again, never a 500.
"""

from __future__ import annotations

import base64
import re
import shutil
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from .conftest import login, start_platform, stop_platform, write_config
from .test_platform_login import api_token, http, start_server, stop_server, wait_for_lab


def edit_accounts(platform, change) -> None:
    """Apply ``change`` to the IdP's accounts list (re-read by the IdP on change)."""
    data = yaml.safe_load(platform.accounts.read_text())
    change(data["users"])
    platform.accounts.write_text(yaml.safe_dump(data))
    time.sleep(0.5)


def add_account(platform, username, **fields) -> None:
    account = {
        "username": username,
        "password": f"{username}-pass",
        "email": f"{username.lower()}-{len(username)}@example.org",
        "groups": ["ai-infn/users"],
        **fields,
    }
    edit_accounts(platform, lambda users: users.append(account))


def remove_account(platform, username) -> None:
    edit_accounts(platform, lambda users: users.__setitem__(
        slice(None), [u for u in users if u["username"] != username]
    ))  # fmt: skip


def bound_sub(platform, name):
    rows = platform.query("SELECT sub FROM labfleet_subjects WHERE name = ?", name)
    return rows[0][0] if rows else None


def fresh_login(browser, platform, username):
    """Log ``username`` in from a new browser (no hub or IdP session); returns the page."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    login(page, platform, username, f"{username}-pass")
    page.wait_for_load_state()
    page.wait_for_url(re.compile(r"/hub/"))
    return page


def assert_account_mismatch(page, platform, name, login_name):
    page.wait_for_load_state()
    assert "/hub/oauth_callback" in page.url
    assert page.inner_text("h1").strip() == "403 : Account mismatch"
    text = page.inner_text("body")
    assert f"The hub user {name} belongs to another identity-provider account" in text, text
    assert f"the account '{login_name}' you signed in with" in text
    assert "labfleet-admins@example.org" in text  # whom to ask (iam.refusal_contact)
    # no hub session came out of it
    page.goto(f"{platform.url}/hub/home")
    page.wait_for_url(re.compile(r"/hub/login"))


def test_accounts_differing_only_in_case_are_not_one_hub_user(platform, browser):
    add_account(platform, "Alice")
    try:
        page = fresh_login(browser, platform, "alice")
        page.context.close()
        owner = bound_sub(platform, "alice")
        assert owner, "alice's first login binds the hub name to her sub"
        page = fresh_login(browser, platform, "Alice")  # IAM's other account
        assert_account_mismatch(page, platform, "alice", "Alice")
        page.context.close()
        assert bound_sub(platform, "alice") == owner
        assert platform.query("SELECT COUNT(*) FROM users WHERE lower(name) = 'alice'") == [(1,)]
        # alice herself still logs in
        page = fresh_login(browser, platform, "alice")
        page.goto(f"{platform.url}/hub/home")
        assert "/hub/home" in page.url
        page.context.close()
    finally:
        remove_account(platform, "Alice")


def test_recreated_account_with_new_sub_is_refused_until_an_admin_rebinds(platform, browser):
    add_account(platform, "dave")
    try:
        page = fresh_login(browser, platform, "dave")
        page.context.close()
        first = bound_sub(platform, "dave")
        assert platform.hub_user("dave") == ("dave", 0)

        # the IAM account is deleted and created again: same name, new sub
        def recreate(users):
            next(u for u in users if u["username"] == "dave")["sub"] = "recreated-dave-0002"

        edit_accounts(platform, recreate)
        page = fresh_login(browser, platform, "dave")
        assert_account_mismatch(page, platform, "dave", "dave")
        page.context.close()
        assert bound_sub(platform, "dave") == first

        # the documented way to hand the name over: delete the binding
        with sqlite3.connect(platform.db) as conn:
            conn.execute("DELETE FROM labfleet_subjects WHERE name = 'dave'")
        page = fresh_login(browser, platform, "dave")
        page.goto(f"{platform.url}/hub/home")
        assert "/hub/home" in page.url
        page.context.close()
        assert bound_sub(platform, "dave") == "recreated-dave-0002"
    finally:
        remove_account(platform, "dave")


# -- an identity provider without refresh tokens -------------------------------

#: The default scopes without offline_access: the IdP issues no refresh token.
NO_OFFLINE = ["openid", "profile", "email", "wlcg", "wlcg.groups"]


def start_without_refresh_tokens(tmp_path_factory, **iam):
    config_dir = tmp_path_factory.mktemp("norefresh")
    values = write_config(config_dir)
    values["iam"]["scopes"] = NO_OFFLINE
    # the IdP's tokens live 3600 s: no longer than the margin, as in issue 10
    values["iam"]["token_refresh_margin"] = 7200
    values["iam"].update(iam)
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(values))
    running = start_platform(config_dir)
    running.values = values
    return running


@pytest.fixture(scope="module")
def no_refresh_platform(tmp_path_factory):
    running = start_without_refresh_tokens(tmp_path_factory)
    yield running
    stop_platform(running.process)
    shutil.rmtree(running.values["spawner"]["storage_root"], ignore_errors=True)


def revoke(platform, access_token) -> None:
    """Revoke ``access_token`` at the IdP, as the hub's client (the session ended there)."""
    issuer = platform.values["iam"]["issuer"].rstrip("/")
    client = f"{platform.values['iam']['client_id']}:{platform.client_secret()}"
    request = urllib.request.Request(
        f"{issuer}/revoke",
        data=urllib.parse.urlencode(
            {"token": access_token, "token_type_hint": "access_token"}
        ).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(client.encode()).decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    userinfo = urllib.request.Request(
        f"{issuer}/userinfo", headers={"Authorization": f"Bearer {access_token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(userinfo, timeout=10)
    assert info.value.code == 401


def test_without_refresh_token_spawns_work_then_expiry_asks_to_log_in(no_refresh_platform, page):
    platform = no_refresh_platform
    login(page, platform, "alice", "alice-pass")
    page.wait_for_url(re.compile(r"/hub/spawn"))
    # issue 10: with a token living <= token_refresh_margin and no refresh token,
    # every spawn was refused ("auth has expired") right after login
    start_server(page, platform, "cpu")
    wait_for_lab(page)
    assert platform.running_servers("alice") == 1
    stop_server(platform, page, "alice")

    # the IAM token the hub holds for alice (the notebook token endpoint hands it out)
    token = api_token(page, platform)
    status, body = http("GET", f"{platform.url}/hub/api/labfleet/iam-token/alice", token)
    assert status == 200, body
    revoke(platform, yaml.safe_load(body)["access_token"])

    # the sign-in can no longer be renewed: the spawn asks to log in again, no 500
    page.goto(f"{platform.url}/hub/spawn")
    with page.expect_response(lambda r: "/hub/spawn" in r.url and r.request.method == "POST") as r:
        start_server(page, platform, "cpu")
    assert r.value.status == 401
    page.wait_for_selector("#labfleet-login-expired")
    text = page.inner_text("#labfleet-login-expired")
    assert "The sign-in of alice with INDIGO IAM has expired" in text
    assert "Please log in again" in text
    assert platform.running_servers("alice") == 0
    hub_log = (platform.state_dir / "logs" / "jupyterhub.log").read_text()
    assert "_token_authenticated" not in hub_log
    href = page.locator("#labfleet-login-again").get_attribute("href")
    assert href.startswith("/hub/login?next=") and "spawn" in urllib.parse.unquote(href)
    # the hub session is over: another hub page goes to the login too
    page.goto(f"{platform.url}/hub/home")
    page.wait_for_url(re.compile(r"/hub/login"))

    # "Log in again" (the IdP may still know the browser) comes back to the spawn form
    page.goto(f"{platform.url}{href}")
    page.get_by_text("Sign in with INDIGO IAM").click()
    page.wait_for_load_state()
    if page.locator("#username").count():
        page.fill("#username", "alice")
        page.fill("#password", "alice-pass")
        page.click("#login")
    page.wait_for_url(re.compile(r"/hub/spawn"))
    page.wait_for_selector("#profile-cpu")
    start_server(page, platform, "cpu")
    wait_for_lab(page)
    assert platform.running_servers("alice") == 1
    stop_server(platform, page, "alice")


def test_periodic_refresh_that_fails_goes_to_the_login(tmp_path_factory, browser):
    # the refresh JupyterHub runs every auth_refresh_age (here 1 s), while it identifies
    # the user, got the same AttributeError (logged with a traceback); now the user
    # counts as logged out and the page goes to the login, which comes back
    platform = start_without_refresh_tokens(tmp_path_factory, auth_refresh_age=1)
    try:
        page = browser.new_context().new_page()
        page.set_default_timeout(60_000)
        login(page, platform, "bob", "bob-pass")
        page.wait_for_url(re.compile(r"/hub/"))
        token = api_token(page, platform)
        status, body = http("GET", f"{platform.url}/hub/api/labfleet/iam-token/bob", token)
        assert status == 200, body
        revoke(platform, yaml.safe_load(body)["access_token"])
        time.sleep(1.5)
        page.goto(f"{platform.url}/hub/home")
        page.wait_for_url(re.compile(r"/hub/login\?next=%2Fhub%2Fhome"))
        page.get_by_text("Sign in with INDIGO IAM").click()
        page.wait_for_load_state()
        if page.locator("#username").count():
            page.fill("#username", "bob")
            page.fill("#password", "bob-pass")
            page.click("#login")
        page.wait_for_url(re.compile(r"/hub/home"))
        hub_log = (platform.state_dir / "logs" / "jupyterhub.log").read_text()
        assert "Sign-in of bob expired and cannot be renewed" in hub_log
        assert "_token_authenticated" not in hub_log
        assert "Failed to get current user" not in hub_log
        page.context.close()
    finally:
        stop_platform(platform.process)
        shutil.rmtree(platform.values["spawner"]["storage_root"], ignore_errors=True)
