"""The single-node platform end to end: `labfleet up`, the dev IdP, the hub, Chromium.

Every test drives a real headless Chromium through the real login: the hub's
"Sign in with INDIGO IAM" button, the identity provider's password form, the
callback, the spawn form and JupyterLab.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import free_port

from .conftest import login, start_platform, stop_platform, write_config


def wait_for_lab(page):
    page.wait_for_url(re.compile(r"/user/[^/]+/lab"), timeout=120_000)
    page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=120_000)


def start_server(page, platform, profile="cpu", **fields):
    """Submit the spawn form for ``profile`` (optionally with other field values)."""
    if "/hub/spawn" not in page.url:
        page.goto(f"{platform.url}/hub/spawn")
    page.check(f"#profile-{profile}")
    for field, value in fields.items():
        page.select_option(f"#{profile}-{field}", value)
    page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")


NEWS_QUESTION = "Would you like to get notified about official Jupyter news?"


def assert_no_news_popup(page, platform, username):
    """The platform decided about Jupyter news (spawner.jupyter_news: never): nobody is asked."""
    plugin = "@jupyterlab/apputils-extension:notification"
    url = f"{platform.url}/user/{username}/lab/api/settings/{plugin}"
    setting = page.request.get(url)
    assert setting.ok, setting.text()
    defaults = {k: v["default"] for k, v in setting.json()["schema"]["properties"].items()}
    assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False
    # JupyterLab asks (a toast) once restored and its settings are loaded; give it time
    page.wait_for_selector(".jp-LabShell", timeout=60_000)
    page.wait_for_timeout(4000)
    assert page.get_by_text(NEWS_QUESTION).count() == 0


def stop_server(platform, page, username):
    page.goto(f"{platform.url}/hub/home")
    # the Stop button works once the page's script has wired it (a click before is lost)
    page.wait_for_function("window._jupyterhub_page_loaded === true")
    stop = page.locator("#stop")
    if stop.count():
        stop.click()
    deadline = time.monotonic() + 60
    while platform.running_servers(username) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert platform.running_servers(username) == 0


def api_token(page, platform) -> str:
    """A token requested the way a user does it: the hub's token page."""
    page.goto(f"{platform.url}/hub/token")
    # JupyterHub sets this flag once its page scripts are wired (the form is JS-driven)
    page.wait_for_function("window._jupyterhub_page_loaded === true")
    page.click("#request-token-form button[type=submit]")
    page.wait_for_function(
        "(() => { const e = document.querySelector('#token-result');"
        " return e !== null && e.innerText.trim().length > 0; })()"
    )
    token = page.locator("#token-result").inner_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32,}", token), token
    return token


def http(method, url, token=None, body=None):
    request = urllib.request.Request(url, method=method, data=body)
    if token:
        request.add_header("Authorization", f"token {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_allowed_user_reaches_jupyterlab(platform, page):
    login(page, platform, "alice", "alice-pass")
    page.wait_for_url(re.compile(r"/hub/spawn"))
    # the form offers exactly what alice's groups (users, ml) allow
    assert page.locator("#profile-gpu-a100").count() == 1
    assert page.locator("#profile-fpga-u55c").count() == 0
    # what this machine has comes first; profiles for accelerators it lacks are in a
    # closed section after them, out of sight (every one of them on a machine without GPUs)
    absent = page.locator("#labfleet-unavailable fieldset")
    not_here = page.locator("fieldset:has(.not-here)")
    assert absent.count() == not_here.count()
    if absent.count():
        assert page.locator("#labfleet-unavailable").get_attribute("open") is None
        assert not absent.first.is_visible()
        assert page.locator(".labfleet-profiles > fieldset .not-here").count() == 0
    start_server(page, platform, "cpu", image="scipy", size="small")
    wait_for_lab(page)
    assert platform.running_servers("alice") == 1
    assert_no_news_popup(page, platform, "alice")
    assert platform.hub_groups("alice") == {"users", "ml"}
    assert platform.hub_user("alice") == ("alice", 0)

    # the notebook's environment holds neither the client secret nor IAM tokens
    pids = subprocess.run(
        ["pgrep", "-f", "jupyterhub-singleuser"], capture_output=True, text=True
    ).stdout.split()
    environs = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environs[pid] = f.read().decode(errors="replace")
        except OSError:
            continue
    mine = [e for e in environs.values() if "JUPYTERHUB_USER=alice" in e]
    assert mine, "alice's single-user server process not found"
    secret = platform.client_secret()
    for environ in mine:
        assert secret not in environ
        assert "LABFLEET_PROFILE=cpu" in environ
        assert "refresh_token" not in environ.lower()
    # the notebook runs under alice's own uid unless the hub said it could not
    alice_pid = next(p for p, e in environs.items() if "JUPYTERHUB_USER=alice" in e)
    uid = os.stat(f"/proc/{alice_pid}").st_uid
    hub_log = (platform.state_dir / "logs" / "jupyterhub.log").read_text()
    if "Not isolating users" not in hub_log:
        assert uid >= 200000, f"alice's notebook runs as uid {uid}"
        # her never-reused number from the hub's database (labfleet_hub.posix_registry)
        [(number,)] = platform.query(
            "SELECT number FROM labfleet_posix_ids WHERE kind = 'user' AND name = 'alice'"
        )
        assert uid == 200000 + number
        home = next(line for line in mine[0].split("\0") if line.startswith("LABFLEET_HOME="))
        home_path = home.split("=", 1)[1]
        assert os.stat(home_path).st_uid == uid
        assert os.stat(home_path).st_mode & 0o777 == 0o700
    stop_server(platform, page, "alice")


def test_notebook_token_endpoint_gives_fresh_iam_token(platform, page):
    login(page, platform, "bob", "bob-pass")
    page.wait_for_url(re.compile(r"/hub/"))
    token = api_token(page, platform)
    status, body = http("GET", f"{platform.url}/hub/api/labfleet/iam-token/bob", token)
    assert status == 200, body
    access_token = json.loads(body)["access_token"]
    # it is a real IAM access token: the identity provider's userinfo accepts it
    issuer = re.search(r"issuer: (\S+)", platform.config_dir.joinpath("labfleet.yaml").read_text())
    userinfo = urllib.request.Request(
        issuer.group(1).rstrip("/") + "/userinfo",
        headers={"Authorization": f"Bearer {access_token}"},
    )
    with urllib.request.urlopen(userinfo, timeout=10) as response:
        claims = json.load(response)
    assert claims["preferred_username"] == "bob"
    # bob's token cannot fetch another user's IAM token
    status, body = http("GET", f"{platform.url}/hub/api/labfleet/iam-token/alice", token)
    assert status in (403, 404), body
    # nor can a request without a token
    assert http("GET", f"{platform.url}/hub/api/labfleet/iam-token/bob")[0] == 403


def test_user_in_no_allowed_group_is_refused(platform, page):
    login(page, platform, "mallory", "mallory-pass")
    page.wait_for_load_state()
    assert "/hub/oauth_callback" in page.url
    # the hub's own page says why, once, which groups are allowed and whom to ask
    page.wait_for_selector("#labfleet-refusal")
    text = page.inner_text("body")
    assert text.count("not in a group allowed on this platform") == 1, text
    assert "Sorry, you are not currently authorized" not in text
    assert page.inner_text("h1").strip() == "Not allowed on this platform"
    assert page.inner_text("#labfleet-allowed-groups").split() == ["ai-infn/users"]
    assert page.inner_text("#labfleet-user-groups").split() == ["other-org/users"]
    contact = page.locator("#labfleet-refusal-contact a")
    assert contact.get_attribute("href") == "mailto:labfleet-admins@example.org"
    assert page.locator("link[href*='style.min.css']").count() == 1  # the hub's own look
    assert platform.hub_user("mallory") is None
    assert platform.running_servers("mallory") == 0


def test_admin_group_makes_hub_admin(platform, page):
    login(page, platform, "carol", "carol-pass")
    page.wait_for_url(re.compile(r"/hub/"))
    assert platform.hub_user("carol") == ("carol", 1)
    assert "admins" in platform.hub_groups("carol")
    page.goto(f"{platform.url}/hub/admin")
    assert page.locator("text=403").count() == 0
    # bob is no admin
    assert platform.hub_user("bob") in (None, ("bob", 0))


def test_group_changes_are_mirrored_at_login(platform, browser):
    platform.set_groups("bob", ["ai-infn/users", "ai-infn/cms", "ai-infn/fpga"])
    context = browser.new_context()
    page = context.new_page()
    login(page, platform, "bob", "bob-pass")
    page.wait_for_url(re.compile(r"/hub/"))
    assert platform.hub_groups("bob") == {"users", "cms", "fpga"}
    context.close()
    platform.set_groups("bob", ["ai-infn/users"])  # removed from cms and fpga
    context = browser.new_context()
    page = context.new_page()
    login(page, platform, "bob", "bob-pass")
    page.wait_for_url(re.compile(r"/hub/"))
    assert platform.hub_groups("bob") == {"users"}
    context.close()
    platform.set_groups("bob", ["ai-infn/users", "ai-infn/cms"])


def test_user_removed_from_allowed_groups_cannot_spawn(platform, browser):
    context = browser.new_context()
    page = context.new_page()
    try:
        login(page, platform, "carol", "carol-pass")
        page.wait_for_url(re.compile(r"/hub/"))
        platform.set_groups("carol", ["other-org/users"])
        page.goto(f"{platform.url}/hub/spawn")
        start_server(page, platform, "cpu")
        page.wait_for_load_state()
        assert "no longer a member of a group allowed" in page.content()
        assert platform.running_servers("carol") == 0
    finally:
        platform.set_groups("carol", ["ai-infn/users", "ai-infn/admins", "ai-infn/ml"])
        context.close()


FORGERIES = [
    # (description, javascript that forges the form, expected message)
    (
        "profile not allowed to the user's groups",
        "document.querySelector('#profile-cpu').value = 'fpga-u55c'",
        "profile 'fpga-u55c' is not available to you",
    ),
    (
        "unknown image",
        "document.querySelector('#cpu-image').options[0].value = 'evil/miner:latest'",
        "image 'evil/miner:latest' is not offered",
    ),
    (
        "unknown size",
        "document.querySelector('#cpu-size').options[0].value = 'huge'",
        "size 'huge' is not offered",
    ),
    (
        "negative accelerator count",
        "const r = document.querySelector('#profile-gpu-t4');"
        "r.removeAttribute('disabled'); r.checked = true;"
        "const c = document.querySelector('#gpu-t4-count'); c.type = 'text'; c.value = '-4';",
        "count -4 of t4 is out of range",
    ),
    (
        "huge accelerator count",
        "const r = document.querySelector('#profile-gpu-t4');"
        "r.removeAttribute('disabled'); r.checked = true;"
        "const c = document.querySelector('#gpu-t4-count'); c.type = 'text'; c.value = '100000';",
        "allowed: 1 to 2",
    ),
]


@pytest.mark.parametrize("what, forge, message", FORGERIES, ids=[f[0] for f in FORGERIES])
def test_forged_form_is_rejected_and_starts_nothing(platform, page, what, forge, message):
    login(page, platform, "bob", "bob-pass")
    page.wait_for_url(re.compile(r"/hub/spawn"))
    page.check("#profile-cpu")
    page.evaluate(forge)
    page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
    page.wait_for_load_state()
    assert message in page.content()
    assert platform.running_servers("bob") == 0


def test_forged_api_options_are_rejected(platform, page):
    login(page, platform, "bob", "bob-pass")
    page.wait_for_url(re.compile(r"/hub/"))
    token = api_token(page, platform)
    url = f"{platform.url}/hub/api/users/bob/server"
    for options, message in [
        ({"profile": "cpu", "cpu": -4}, "unknown option(s) cpu"),
        ({"profile": "cpu", "mem_limit": "9000Ti"}, "unknown option(s) mem_limit"),
        ({"profile": "gpu-a100"}, "profile 'gpu-a100' is not available to you"),
        ({"profile": "cpu", "image": "docker.io/evil"}, "image 'docker.io/evil' is not offered"),
    ]:
        status, body = http("POST", url, token, json.dumps(options).encode())
        assert status == 400, body
        assert message in body
        assert platform.running_servers("bob") == 0


def test_wrong_password_stays_at_identity_provider(platform, page):
    login(page, platform, "alice", "wrong-password")
    page.wait_for_selector(".error")
    assert "Invalid username or password" in page.inner_text(".error")
    assert "/interaction/" in page.url
    assert page.url.startswith(re.sub(r":\d+$", "", platform.url)) is True


def test_unreachable_identity_provider_gives_clear_error(tmp_path, browser):
    dead_issuer = f"http://127.0.0.1:{free_port()}/"
    config_dir = tmp_path / "noidp"
    write_config(config_dir, issuer=dead_issuer, idp=False)
    running = start_platform(config_dir)
    try:
        page = browser.new_page()
        page.goto(f"{running.url}/hub/login")
        page.get_by_text("Sign in with INDIGO IAM").click()
        page.wait_for_load_state()
        text = page.content()
        assert "cannot be reached right now" in text and dead_issuer in text
        # the hub stays up
        with urllib.request.urlopen(f"{running.url}/hub/health", timeout=10) as response:
            assert response.status == 200
        assert running.process.poll() is None
        page.close()
    finally:
        stop_platform(running.process)


def test_check_config_reports_file_and_field(tmp_path):
    config_dir = tmp_path / "bad"
    write_config(config_dir)
    catalogue = config_dir / "catalogue.yaml"
    catalogue.write_text(catalogue.read_text().replace("cpu: 4", "cpu: -4", 1))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "labfleet_hub.cli",
            "check-config",
            "--config",
            str(config_dir / "labfleet.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "catalogue.yaml: sizes[1] 'medium': field cpu:" in result.stderr
    # `labfleet up` stops at the same error before starting anything
    up = subprocess.run(
        [
            sys.executable,
            "-m",
            "labfleet_hub.cli",
            "up",
            "--config",
            str(config_dir / "labfleet.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 1 and "field cpu:" in up.stderr
    assert not (config_dir / "state").exists()
