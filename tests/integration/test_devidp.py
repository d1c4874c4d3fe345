"""The development identity provider as a real OIDC provider on loopback.

Runs the Node server (npm ``oidc-provider``) through the Python launcher and
drives the authorization-code flow with PKCE by hand: follow redirects, carry
cookies, post the login form, exchange the code, call userinfo, refresh.
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import http.cookiejar
import json
import secrets
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from labfleet_hub import devidp

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ACCOUNTS = REPO / "config" / "accounts.yaml"
SCOPE = "openid profile email offline_access wlcg wlcg.groups"
CLIENT_ID = "labfleet-hub"
CLIENT_SECRET = "hub-test-secret"
REDIRECT_URI = "http://127.0.0.1:1/hub/oauth_callback"  # never contacted
PUBLIC_CLIENT = "public-cli"


def _need_node() -> None:
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are needed for the development identity provider")


def _clients() -> list[dict]:
    return [
        {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uris": [REDIRECT_URI],
        },
        {"client_id": PUBLIC_CLIENT, "redirect_uris": [REDIRECT_URI]},
    ]


def _start(tmp_path: Path, accounts: Path, **kw) -> devidp.DevIdP:
    _need_node()
    return devidp.start(
        accounts_path=accounts,
        clients=_clients(),
        log_path=tmp_path / f"devidp-{secrets.token_hex(3)}.log",
        **kw,
    )


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("devidp")
    accounts = tmp / "accounts.yaml"
    shutil.copy(ACCOUNTS, accounts)
    server = _start(tmp, accounts)
    yield server
    server.stop()
    # passwords and tokens never reach the log
    text = server.log_path.read_text()
    for secret in ("alice-pass", "bob-pass", "wrong-pass", CLIENT_SECRET):
        assert secret not in text
    assert "DEVELOPMENT IDENTITY PROVIDER — NOT FOR PRODUCTION" in text
    assert f"READY {server.issuer}" in text


# ----------------------------------------------------------------- client --


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class _FormParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms: list[dict] = []
        self.ids: dict[str, dict] = {}
        self.error_texts: list[str] = []
        self._in_error = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids[a["id"]] = {"tag": tag, **a}
        if tag == "form":
            self.forms.append({"action": a.get("action"), "method": a.get("method")})
        if "error" in (a.get("class") or "").split():
            self._in_error += 1
            self.error_texts.append("")
        elif self._in_error:
            self._in_error += 1

    def handle_endtag(self, tag):
        if self._in_error:
            self._in_error -= 1

    def handle_data(self, data):
        if self._in_error:
            self.error_texts[-1] += data


class Browser:
    """Just enough of a browser: a cookie jar, manual redirects, form posts."""

    def __init__(self):
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),  # loopback only, never a proxy
            urllib.request.HTTPCookieProcessor(self.jar),
            _NoRedirect(),
        )

    def request(self, url, data=None, headers=None):
        if isinstance(data, dict):
            data = urllib.parse.urlencode(data).encode()
        req = urllib.request.Request(url, data=data, headers=headers or {})
        try:
            resp = self.opener.open(req, timeout=10)
        except urllib.error.HTTPError as err:
            resp = err
        with resp:
            return resp.status, dict(resp.headers), resp.read().decode("utf-8", "replace")

    def follow(self, url, data=None, stop_prefix=REDIRECT_URI, limit=10):
        """Request ``url`` and follow redirects until a page, or ``stop_prefix``."""
        for _ in range(limit):
            status, headers, body = self.request(url, data)
            data = None
            if status in (301, 302, 303, 307) and "Location" in headers:
                url = urllib.parse.urljoin(url, headers["Location"])
                if url.startswith(stop_prefix):
                    return url, status, body
                continue
            return url, status, body
        raise AssertionError("too many redirects")


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.decode().rstrip("=")


def _jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _basic(client_id=CLIENT_ID, secret=CLIENT_SECRET) -> dict:
    raw = f"{urllib.parse.quote(client_id)}:{urllib.parse.quote(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def _authorize_url(idp, challenge, state, scope=SCOPE, client_id=CLIENT_ID, **extra):
    q = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }
    return f"{idp.issuer}/authorize?{urllib.parse.urlencode(q)}"


def _login_page(browser, idp, challenge, state, **kw):
    url, status, body = browser.follow(_authorize_url(idp, challenge, state, **kw))
    assert status == 200, body
    assert "/interaction/" in url
    parser = _FormParser()
    parser.feed(body)
    return url, body, parser


def _submit_login(browser, page_url, parser, username, password):
    form = next(f for f in parser.forms if f["action"] and f["action"].endswith("/login"))
    assert form["method"] == "post"
    action = urllib.parse.urljoin(page_url, form["action"])
    return browser.follow(action, {"username": username, "password": password})


def login(idp, username, password, *, scope=SCOPE, client_id=CLIENT_ID, browser=None):
    """Run the browser part of the flow; return (code, verifier, browser)."""
    browser = browser or Browser()
    verifier, challenge = _pkce()
    state = secrets.token_urlsafe(8)
    page_url, _, parser = _login_page(
        browser, idp, challenge, state, scope=scope, client_id=client_id
    )
    url, status, body = _submit_login(browser, page_url, parser, username, password)
    assert url.startswith(REDIRECT_URI), (status, body[:500])
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert q["state"] == state
    assert q["iss"] == idp.issuer
    return q["code"], verifier, browser


def token_request(idp, form, headers=None):
    status, _, body = Browser().request(f"{idp.issuer}/token", form, headers)
    return status, json.loads(body)


def exchange(idp, code, verifier, client_id=CLIENT_ID):
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    headers = _basic() if client_id == CLIENT_ID else None
    if client_id != CLIENT_ID:
        form["client_id"] = client_id
    status, tokens = token_request(idp, form, headers)
    assert status == 200, tokens
    return tokens


def refresh(idp, refresh_token):
    return token_request(
        idp, {"grant_type": "refresh_token", "refresh_token": refresh_token}, _basic()
    )


def userinfo(idp, access_token):
    status, _, body = Browser().request(
        f"{idp.issuer}/userinfo", headers={"Authorization": f"Bearer {access_token}"}
    )
    assert status == 200, body
    return json.loads(body)


# ------------------------------------------------------------------ tests --


def test_discovery_has_iam_endpoints_and_scopes(idp):
    _, _, body = Browser().request(idp.discovery_url)
    doc = json.loads(body)
    assert doc["issuer"] == idp.issuer
    for key, path in {
        "authorization_endpoint": "/authorize",
        "token_endpoint": "/token",
        "userinfo_endpoint": "/userinfo",
        "jwks_uri": "/jwk",
        "revocation_endpoint": "/revoke",
        "introspection_endpoint": "/introspect",
        "end_session_endpoint": "/logout",
    }.items():
        assert doc[key] == idp.issuer + path
    assert set(SCOPE.split()) <= set(doc["scopes_supported"])
    assert "S256" in doc["code_challenge_methods_supported"]
    for claim in ("groups", "wlcg.groups", "preferred_username", "email"):
        assert claim in doc["claims_supported"]
    _, _, jwk = Browser().request(doc["jwks_uri"])
    keys = json.loads(jwk)["keys"]
    assert keys and all("d" not in k for k in keys)  # public keys only


def test_login_page_has_the_expected_form(idp):
    _, challenge = _pkce()
    _, body, parser = _login_page(Browser(), idp, challenge, "s")
    assert parser.ids["username"]["tag"] == "input"
    assert parser.ids["password"]["type"] == "password"
    assert parser.ids["login"]["tag"] == "button"
    assert "DEVELOPMENT IDENTITY PROVIDER" in body
    assert not parser.error_texts


def test_full_code_flow_with_pkce_userinfo_and_refresh(idp):
    code, verifier, _ = login(idp, "alice", "alice-pass")
    tokens = exchange(idp, code, verifier)
    assert tokens["token_type"].lower() == "bearer"
    assert {"access_token", "id_token", "refresh_token"} <= set(tokens)
    assert set(tokens["scope"].split()) == set(SCOPE.split())

    info = userinfo(idp, tokens["access_token"])
    assert info["preferred_username"] == "alice"
    assert info["email"] == "alice@example.org"
    assert info["name"] == "Alice Researcher"
    assert info["groups"] == ["ai-infn/users", "ai-infn/ml"]
    assert info["wlcg.groups"] == ["/ai-infn/users", "/ai-infn/ml"]
    sub = info["sub"]
    assert len(sub) == 36 and sub.count("-") == 4

    id_claims = _jwt_claims(tokens["id_token"])
    assert id_claims["iss"] == idp.issuer
    assert id_claims["aud"] == CLIENT_ID
    assert id_claims["sub"] == sub
    assert id_claims["groups"] == ["ai-infn/users", "ai-infn/ml"]

    status, refreshed = refresh(idp, tokens["refresh_token"])
    assert status == 200, refreshed
    assert refreshed["access_token"] != tokens["access_token"]
    assert "refresh_token" in refreshed
    assert _jwt_claims(refreshed["id_token"])["sub"] == sub
    info2 = userinfo(idp, refreshed["access_token"])
    assert info2["sub"] == sub and info2["groups"] == info["groups"]

    # the code is single use; replaying it revokes what it gave (RFC 6749 4.1.2)
    status, err = token_request(
        idp,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        _basic(),
    )
    assert status == 400 and err["error"] == "invalid_grant"

    status, err = refresh(idp, refreshed["refresh_token"])
    assert status == 400 and err["error"] == "invalid_grant"

    # sub is stable across logins
    code, verifier, _ = login(idp, "alice", "alice-pass")
    assert userinfo(idp, exchange(idp, code, verifier)["access_token"])["sub"] == sub


def test_sso_session_skips_the_login_form(idp):
    code, verifier, browser = login(idp, "bob", "bob-pass")
    exchange(idp, code, verifier)
    _, challenge = _pkce()
    url, status, _ = browser.follow(_authorize_url(idp, challenge, "again"))
    assert url.startswith(REDIRECT_URI) and "code=" in url


def test_wrong_password_stays_on_login_page_without_code(idp):
    browser = Browser()
    _, challenge = _pkce()
    page_url, _, parser = _login_page(browser, idp, challenge, "s1")
    for user, password in (("alice", "wrong-pass"), ("nobody", "alice-pass"), ("alice", "")):
        url, status, body = _submit_login(browser, page_url, parser, user, password)
        assert status == 200
        assert not url.startswith(REDIRECT_URI)
        assert "code=" not in url
        p = _FormParser()
        p.feed(body)
        assert any("Invalid username or password" in t for t in p.error_texts), body
        assert "username" in p.ids and "password" in p.ids and "login" in p.ids
    # the same interaction still accepts the right password afterwards
    url, _, _ = _submit_login(browser, page_url, parser, "alice", "alice-pass")
    assert url.startswith(REDIRECT_URI) and "code=" in url


def test_pkce_verifier_is_checked(idp):
    code, _, _ = login(idp, "alice", "alice-pass")
    status, err = token_request(
        idp,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": _pkce()[0],
        },
        _basic(),
    )
    assert status == 400 and err["error"] == "invalid_grant"


def test_wrong_client_secret_is_rejected(idp):
    code, verifier, _ = login(idp, "alice", "alice-pass")
    status, err = token_request(
        idp,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        _basic(secret="nope"),
    )
    assert status == 401 and err["error"] == "invalid_client"


def test_public_client_with_pkce(idp):
    code, verifier, _ = login(idp, "carol", "carol-pass", client_id=PUBLIC_CLIENT)
    tokens = exchange(idp, code, verifier, client_id=PUBLIC_CLIENT)
    info = userinfo(idp, tokens["access_token"])
    assert info["groups"] == ["ai-infn/users", "ai-infn/admins", "ai-infn/ml"]


def test_user_outside_allowed_groups_still_authenticates(idp):
    # the IdP does not decide access; the hub refuses mallory by group
    code, verifier, _ = login(idp, "mallory", "mallory-pass")
    info = userinfo(idp, exchange(idp, code, verifier)["access_token"])
    assert info["groups"] == ["other-org/users"]
    assert info["wlcg.groups"] == ["/other-org/users"]


def test_scopes_limit_claims_and_offline_access(idp):
    code, verifier, _ = login(idp, "bob", "bob-pass", scope="openid profile")
    tokens = exchange(idp, code, verifier)
    assert "refresh_token" not in tokens
    info = userinfo(idp, tokens["access_token"])
    assert info["preferred_username"] == "bob"
    assert "email" not in info and "wlcg.groups" not in info


def test_introspect_and_revoke(idp):
    code, verifier, _ = login(idp, "alice", "alice-pass")
    tokens = exchange(idp, code, verifier)
    status, _, body = Browser().request(
        f"{idp.issuer}/introspect", {"token": tokens["access_token"]}, _basic()
    )
    assert status == 200 and json.loads(body)["active"] is True
    status, _, _ = Browser().request(
        f"{idp.issuer}/revoke",
        {"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
        _basic(),
    )
    assert status == 200
    status, err = refresh(idp, tokens["refresh_token"])
    assert status == 400 and err["error"] == "invalid_grant"


def test_group_change_in_accounts_file_shows_at_refresh_and_login(tmp_path):
    accounts = tmp_path / "accounts.yaml"
    shutil.copy(ACCOUNTS, accounts)
    server = _start(tmp_path, accounts)
    try:
        code, verifier, _ = login(server, "bob", "bob-pass")
        tokens = exchange(server, code, verifier)
        assert "ai-infn/cms" in userinfo(server, tokens["access_token"])["groups"]

        text = accounts.read_text()
        assert "groups: [ai-infn/users, ai-infn/cms]" in text
        accounts.write_text(
            text.replace(
                "groups: [ai-infn/users, ai-infn/cms]", "groups: [ai-infn/users, ai-infn/ml]"
            )
        )

        status, refreshed = refresh(server, tokens["refresh_token"])
        assert status == 200, refreshed
        assert _jwt_claims(refreshed["id_token"])["groups"] == ["ai-infn/users", "ai-infn/ml"]
        info = userinfo(server, refreshed["access_token"])
        assert info["groups"] == ["ai-infn/users", "ai-infn/ml"]
        assert info["wlcg.groups"] == ["/ai-infn/users", "/ai-infn/ml"]

        code, verifier, _ = login(server, "bob", "bob-pass")
        info = userinfo(server, exchange(server, code, verifier)["access_token"])
        assert info["groups"] == ["ai-infn/users", "ai-infn/ml"]

        # a broken edit keeps the last good accounts; SIGHUP reloads on demand
        accounts.write_text("users: [oops")
        server.reload_accounts()
        code, verifier, _ = login(server, "bob", "bob-pass")
        assert userinfo(server, exchange(server, code, verifier)["access_token"])["groups"]
        assert "keeping the previous accounts" in server.log_tail(100)

        # removing the user makes the refresh token useless
        accounts.write_text(text.replace("- username: bob", "- username: robert"))
        status, err = refresh(server, refreshed["refresh_token"])
        assert status == 400 and err["error"] == "invalid_grant"
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_withheld_groups_are_given_to_nobody(tmp_path):
    accounts = tmp_path / "accounts.yaml"
    text = ACCOUNTS.read_text()
    assert "groups: [ai-infn/users, ai-infn/admins, ai-infn/ml]" in text  # carol's
    # written either way, the withheld group reaches no claim
    accounts.write_text(
        text.replace("[ai-infn/users, ai-infn/cms]", "[ai-infn/users, /ai-infn/admins]")
    )
    server = _start(tmp_path, accounts, withhold_groups=["ai-infn/admins"])
    try:
        assert "withheld: ai-infn/admins" in server.log_tail(100)
        for name, groups in (
            ("carol", ["ai-infn/users", "ai-infn/ml"]),
            ("bob", ["ai-infn/users"]),
        ):
            code, verifier, _ = login(server, name, f"{name}-pass")
            tokens = exchange(server, code, verifier)
            info = userinfo(server, tokens["access_token"])
            assert info["groups"] == groups
            assert info["wlcg.groups"] == [f"/{g}" for g in groups]
            assert _jwt_claims(tokens["id_token"])["groups"] == groups
    finally:
        server.stop()


def test_state_dir_keeps_refresh_tokens_across_restart(tmp_path):
    accounts = tmp_path / "accounts.yaml"
    shutil.copy(ACCOUNTS, accounts)
    state = tmp_path / "state"
    server = _start(tmp_path, accounts, state_dir=state)
    port = server.port
    try:
        code, verifier, _ = login(server, "carol", "carol-pass")
        tokens = exchange(server, code, verifier)
    finally:
        server.stop()
    server = _start(tmp_path, accounts, state_dir=state, port=port)
    try:
        status, refreshed = refresh(server, tokens["refresh_token"])
        assert status == 200, refreshed
        assert userinfo(server, refreshed["access_token"])["preferred_username"] == "carol"
    finally:
        server.stop()
    assert (state / "secrets.json").stat().st_mode & 0o077 == 0


def test_startup_error_is_reported_with_log_tail(tmp_path):
    _need_node()
    bad = tmp_path / "accounts.yaml"
    bad.write_text("users:\n  - username: x\n")
    with pytest.raises(devidp.DevIdPError) as exc:
        devidp.start(accounts_path=bad, clients=_clients(), log_path=tmp_path / "bad.log")
    assert "exited with code 2" in str(exc.value)
    assert '"password" must be a non-empty string' in str(exc.value)


def test_a_start_that_stalls_is_killed_and_tried_again(tmp_path):
    """The first run hangs alive without listening (as one CI start did); the launcher
    kills it after half its timeout and the second run serves discovery."""
    _need_node()
    marker, stalled_pid = tmp_path / "first-run", tmp_path / "stalled.pid"
    node = tmp_path / "node"
    node.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{marker}" ]; then touch "{marker}"; echo $$ > "{stalled_pid}"; '
        "exec sleep 600; fi\n"
        f'exec {shutil.which("node")} "$@"\n'
    )
    node.chmod(0o755)
    accounts = tmp_path / "accounts.yaml"
    shutil.copy(ACCOUNTS, accounts)
    server = _start(tmp_path, accounts, node=str(node), timeout=6)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
        with opener.open(f"{server.local_url}/.well-known/openid-configuration") as resp:
            doc = json.load(resp)
        assert doc["issuer"] == server.issuer
        assert "killed, starting again" in server.log_path.read_text()
        # the stalled first run is gone, not left behind
        assert not Path(f"/proc/{stalled_pid.read_text().strip()}").exists()
    finally:
        server.stop()
