"""A real JupyterHub for batch-service tests, and the service run in-process on loopback.

The hub (jupyterhub + configurable-http-proxy, DummyAuthenticator serving
labfleet's hub-ids endpoint) registers two services: ``batch`` (the service
under test, authenticated through HubAuth with its API token, allowed to read
users' hub ids as in the platform) and ``provisioner`` (creates users, groups and user tokens
through the hub REST API). Users' tokens are real hub tokens from
``POST /hub/api/users/<name>/tokens``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from labfleet_hub.cli import stop_stray_proxy
from labfleet_hub.node_pieces import ensure_proxy

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BATCH_SCOPE = "access:services!service=batch"
#: What a notebook's token needs for the batch service (docs/batch.md).
USER_TOKEN_SCOPES = [BATCH_SCOPE]

HUB_CONFIG = """
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/cookie_secret"
c.JupyterHub.pid_file = "{state}/jupyterhub.pid"
from jupyterhub.auth import DummyAuthenticator
from labfleet_hub import api_handlers, posix_ids


class IdsAuthenticator(DummyAuthenticator):
    # serves the hub ids endpoint, as labfleet's IAMAuthenticator does

    def get_handlers(self, app):
        return [*super().get_handlers(app), *api_handlers.POSIX_IDS_HANDLERS]


c.JupyterHub.authenticator_class = IdsAuthenticator
c.JupyterHub.custom_scopes = posix_ids.CUSTOM_SCOPES
c.Authenticator.allow_all = True
c.ConfigurableHTTPProxy.command = ["{chp}"]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api}"
c.ConfigurableHTTPProxy.auth_token = "{proxy_token}"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.services = [
    {{"name": "batch", "api_token": "{batch_token}", "url": "http://127.0.0.1:{service_port}"}},
    {{"name": "provisioner", "api_token": "{admin_token}"}},
]
c.JupyterHub.load_roles = [
    {{"name": "user", "scopes": ["self", "{batch_scope}"]}},
    {{"name": "batch-ids", "scopes": [posix_ids.POSIX_IDS_SCOPE], "services": ["batch"]}},
    {{
        "name": "provisioner",
        # the batch scope: it stands in for the accounting service on api/limits
        "scopes": ["admin:users", "admin:groups", "tokens", "read:users", "{batch_scope}"],
        "services": ["provisioner"],
    }},
]
"""


@dataclass
class Hub:
    url: str  # the hub's own API base: http://127.0.0.1:<hub_port>/hub/api
    state: Path
    process: subprocess.Popen
    admin_token: str
    batch_token: str
    service_port: int
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def db_path(self) -> str:
        return str(self.state / "jupyterhub.sqlite")

    def db_ids(self, username: str) -> tuple[int, dict[str, int]]:
        """The numbers the user's uid and groups' gids are made of, straight from the
        hub's database (``labfleet_posix_ids``, labfleet_hub.posix_registry; ground
        truth for tests, once something asked for them)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as db:
            [(user_id,)] = db.execute(
                "SELECT number FROM labfleet_posix_ids WHERE kind = 'user' AND name = ?",
                (username,),
            )
            groups = db.execute(
                "SELECT g.name, p.number FROM groups g JOIN user_group_map m ON m.group_id = g.id "
                "JOIN users u ON u.id = m.user_id "
                "JOIN labfleet_posix_ids p ON p.kind = 'group' AND p.name = g.name "
                "WHERE u.name = ?",
                (username,),
            ).fetchall()
        return int(user_id), {name: int(gid) for name, gid in groups}

    def hub_db_ids(self, username: str) -> tuple[int, dict[str, int]]:
        """The user's and groups' own ids in the hub's database (reused by SQLite)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as db:
            [(user_id,)] = db.execute("SELECT id FROM users WHERE name = ?", (username,))
            groups = db.execute(
                "SELECT g.name, g.id FROM groups g JOIN user_group_map m ON m.group_id = g.id "
                "WHERE m.user_id = ?",
                (user_id,),
            ).fetchall()
        return int(user_id), {name: int(gid) for name, gid in groups}

    def api(self, method: str, path: str, body=None, token: str | None = None):
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {token or self.admin_token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def add_user(self, name: str, groups: list[str], scopes=None) -> str:
        """Create user and groups (idempotent); returns a real hub token with ``scopes``."""
        try:
            self.api("POST", f"/users/{name}")
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise
        for group in groups:
            try:
                self.api("POST", f"/groups/{group}")
            except urllib.error.HTTPError as e:
                if e.code != 409:
                    raise
            self.api("POST", f"/groups/{group}/users", {"users": [name]})
        token = self.api(
            "POST",
            f"/users/{name}/tokens",
            {"scopes": USER_TOKEN_SCOPES if scopes is None else scopes, "note": "batch test"},
        )["token"]
        self.tokens.setdefault(name, token)
        return token


def start_hub(state: Path, timeout: float = 90) -> Hub:
    # the same call `labfleet setup` makes: installs the proxy if nothing did yet, so this
    # harness works whichever suite runs first
    chp = ensure_proxy()
    state.mkdir(parents=True, exist_ok=True)
    hub_port, admin, batch = free_port(), secrets.token_hex(16), secrets.token_hex(16)
    service_port = free_port()
    (state / "jupyterhub_config.py").write_text(
        HUB_CONFIG.format(
            port=free_port(),
            hub_port=hub_port,
            state=state,
            chp=chp,
            proxy_api=free_port(),
            proxy_token=secrets.token_hex(16),
            batch_token=batch,
            admin_token=admin,
            service_port=service_port,
            batch_scope=BATCH_SCOPE,
        )
    )
    log = open(state / "hub.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(state / "jupyterhub_config.py")],
        cwd=state,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    hub = Hub(f"http://127.0.0.1:{hub_port}/hub/api", state, process, admin, batch, service_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyterhub exited:\n{(state / 'hub.log').read_text()[-3000:]}")
        try:
            hub.api("GET", "/")
            return hub
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    stop_hub(hub)
    raise RuntimeError(
        f"jupyterhub not up in {timeout}s:\n{(state / 'hub.log').read_text()[-3000:]}"
    )


def stop_hub(hub: Hub) -> None:
    if hub.process.poll() is None:
        os.killpg(hub.process.pid, signal.SIGTERM)
        try:
            hub.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(hub.process.pid, signal.SIGKILL)
            hub.process.wait()
    # The proxy runs in its own session, and a hub stopped while it still waits for
    # its services (up to 30 s after start) has no SIGTERM handler to stop it.
    stop_stray_proxy(hub.state / "jupyterhub-proxy.pid")


def hub_auth(hub: Hub):
    """The batch service's HubAuth, as the hub would configure it through the environment."""
    from jupyterhub.services.auth import HubAuth

    return HubAuth(
        api_token=hub.batch_token,
        api_url=hub.url,
        access_scopes={BATCH_SCOPE},
        cache_max_age=60,
    )
