"""The real platform for integration tests: `labfleet up`, a dev IdP, Chromium.

Everything runs on 127.0.0.1 with free ports: the hub and its proxy, the
development identity provider (a real OpenID Connect server), single-user
servers, and a headless Debian Chromium driven by Playwright.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@dataclass
class Platform:
    url: str
    config_dir: Path
    state_dir: Path
    accounts: Path
    process: subprocess.Popen
    log: Path

    @property
    def db(self) -> Path:
        return self.state_dir / "jupyterhub.sqlite"

    def query(self, sql: str, *args):
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            return conn.execute(sql, args).fetchall()

    def hub_user(self, name: str):
        rows = self.query("SELECT name, admin FROM users WHERE name = ?", name)
        return rows[0] if rows else None

    def hub_groups(self, name: str) -> set[str]:
        rows = self.query(
            "SELECT g.name FROM groups g JOIN user_group_map m ON m.group_id = g.id "
            "JOIN users u ON u.id = m.user_id WHERE u.name = ?",
            name,
        )
        return {r[0] for r in rows}

    def running_servers(self, name: str) -> int:
        rows = self.query(
            "SELECT COUNT(*) FROM spawners s JOIN users u ON u.id = s.user_id "
            "WHERE u.name = ? AND s.server_id IS NOT NULL",
            name,
        )
        return rows[0][0]

    def client_secret(self) -> str:
        return (self.state_dir / "secrets" / "iam-client-secret").read_text().strip()

    def set_groups(self, username: str, groups: list[str]) -> None:
        data = yaml.safe_load(self.accounts.read_text())
        for user in data["users"]:
            if user["username"] == username:
                user["groups"] = groups
        self.accounts.write_text(yaml.safe_dump(data))
        time.sleep(0.3)  # the IdP re-reads the file on change


def write_config(config_dir: Path, issuer: str | None = None, idp: bool = True) -> dict:
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in ("catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, config_dir / name)
    hub_port, idp_port = free_port(), free_port()
    values = yaml.safe_load((ROOT / "config" / "labfleet.yaml").read_text())
    values["hub"].update(port=hub_port, hub_port=free_port(), state_dir="state")
    values["proxy"] = {"api_port": free_port()}
    # carol is a hub admin here only because the tests ask for it (devidp.demo_admin)
    values["devidp"] = {
        "enabled": idp, "port": idp_port, "accounts": "accounts.yaml", "demo_admin": True,
    }  # fmt: skip
    values["iam"]["issuer"] = issuer or f"http://127.0.0.1:{idp_port}/"
    # pytest's tmp dirs are mode 0700: notebooks running under their users' own
    # uids could not reach their homes there, so storage lives in a 0755 dir
    storage = Path(tempfile.mkdtemp(prefix="labfleet-storage-"))
    storage.chmod(0o755)
    values["spawner"]["storage_root"] = str(storage)
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(values))
    return values


def start_platform(config_dir: Path, timeout: float = 180) -> Platform:
    values = yaml.safe_load((config_dir / "labfleet.yaml").read_text())
    log = config_dir / "labfleet-up.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labfleet_hub.cli",
            "up",
            "--config",
            str(config_dir / "labfleet.yaml"),
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "labfleet is up" in log.read_text(errors="replace"):
            break
        if process.poll() is not None:
            raise RuntimeError(f"labfleet up exited {process.returncode}:\n{log.read_text()}")
        time.sleep(0.3)
    else:
        stop_platform(process)
        raise RuntimeError(f"labfleet up did not come up in {timeout}s:\n{log.read_text()}")
    return Platform(
        url=f"http://127.0.0.1:{values['hub']['port']}",
        config_dir=config_dir,
        state_dir=config_dir / "state",
        accounts=config_dir / "accounts.yaml",
        process=process,
        log=log,
    )


def stop_platform(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def platform(tmp_path_factory):
    config_dir = tmp_path_factory.mktemp("platform")
    values = write_config(config_dir)
    running = start_platform(config_dir)
    yield running
    stop_platform(running.process)
    shutil.rmtree(values["spawner"]["storage_root"], ignore_errors=True)


# Module scope, not session: Playwright's sync API keeps an asyncio loop
# running in the main thread while it is open, and every async test collected
# after it would then fail with "cannot be called from a running event loop".
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (it installs Debian chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


#: Where browser tests leave their screenshots (test artifacts, for a person to look at).
SCREENSHOTS = "LABFLEET_SCREENSHOTS"


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """Save ``page`` as ``<$LABFLEET_SCREENSHOTS or /tmp/labfleet-screenshots>/<name>.png``."""
    folder = Path(os.environ.get(SCREENSHOTS) or "/tmp/labfleet-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def assert_hub_layout(page, username: str) -> None:
    """The page is drawn like the hub's own: its navigation bar, stylesheet and dark mode."""
    nav = page.locator("nav.navbar")
    assert nav.count() == 1
    for name in ("Home", "Token"):
        assert nav.get_by_role("link", name=name, exact=True).count() == 1, name
    services = nav.locator("a.dropdown-toggle", has_text="Services")  # role=button, as the hub
    assert nav.locator("#logout").inner_text().strip() == "Logout"
    assert nav.locator("#login_widget").inner_text().strip().startswith(username)
    assert page.locator("#dark-theme-toggle").count() == 1
    # the hub's Bootstrap stylesheet is loaded from the hub and applies
    loaded = page.evaluate(
        """() => [...document.styleSheets].some(s => s.href
            && new URL(s.href).pathname.endsWith('/hub/static/css/style.min.css')
            && s.cssRules.length > 100)"""
    )
    assert loaded, "the hub's stylesheet is not loaded"
    assert page.evaluate("getComputedStyle(document.querySelector('nav.navbar')).display") == "flex"
    # the hub's menu: the services, as in the hub's own navigation bar
    services.click()
    menu = nav.locator(".dropdown-menu.show a.dropdown-item")
    menu.first.wait_for()
    assert sorted(menu.all_inner_texts()) == ["accounting", "batch"]
    services.click()  # closed again


def login(page, platform: Platform, username: str, password: str) -> None:
    """Log in through the hub's IAM button and the identity provider's form."""
    page.goto(f"{platform.url}/hub/login")
    page.get_by_text("Sign in with INDIGO IAM").click()
    page.wait_for_selector("#username")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login")
