"""The platform's state is private, and no command line holds a secret (issue 10).

A real `labfleet up` with the shipped layout (`config/labfleet.yaml`'s
`hub.state_dir` and `spawner.storage_root`, relative to a config folder every
uid may traverse, as a checkout is), alice logged in through the development
IdP with a running notebook. Then, from alice's own uid and groups (the ids
her notebook runs with), the hub database, the accounting ledger and its WAL,
the logs and the secrets cannot be read, while her notebook keeps working and
the account names users need stay readable; and no process on the machine
shows a database URL, a generated secret or a token on its command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from labfleet_hub.configurer import load_values

from .conftest import ROOT, login, start_platform, stop_platform, write_config
from .test_platform_login import start_server, wait_for_lab


def processes():
    """(pid, argv bytes, environment) of every process still there.

    Every user may read every command line; environments only their own (root: all).
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone
            continue
        try:
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            environ = ""
        env = dict(item.split("=", 1) for item in environ.split("\0") if "=" in item)
        yield int(entry.name), cmdline, env


def hub_port(values: dict) -> int:
    return values["hub"]["hub_port"]


@pytest.fixture(scope="module")
def shipped(browser):
    """The platform with the bundled layout, and alice's running notebook (a page)."""
    base = Path(tempfile.mkdtemp(prefix="labfleet-private-"))
    base.chmod(0o755)  # like a checkout: every uid may traverse it
    config_dir = base / "config"
    values = write_config(config_dir)
    config_dir.chmod(0o755)
    shutil.rmtree(values["spawner"]["storage_root"])
    bundled = yaml.safe_load((ROOT / "config" / "labfleet.yaml").read_text())
    values["hub"]["state_dir"] = bundled["hub"]["state_dir"]
    values["spawner"]["storage_root"] = bundled["spawner"]["storage_root"]
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(values))
    resolved = load_values(config_dir / "labfleet.yaml")
    running = start_platform(config_dir)
    running = dataclasses.replace(running, state_dir=Path(resolved["hub"]["state_dir"]))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        login(page, running, "alice", "alice-pass")
        page.wait_for_url(re.compile(r"/hub/spawn"))
        start_server(page, running, "cpu", image="scipy", size="small")
        wait_for_lab(page)
        yield running, resolved, page
    finally:
        context.close()
        stop_platform(running.process)
        shutil.rmtree(base, ignore_errors=True)


def notebook_of(user: str, hub_port: int) -> tuple[int, dict]:
    """The pid and environment of ``user``'s single-user server on this platform."""
    api = f"127.0.0.1:{hub_port}/"
    for pid, cmdline, env in processes():
        if (
            b"jupyterhub-singleuser" in cmdline
            and env.get("JUPYTERHUB_USER") == user
            and api in env.get("JUPYTERHUB_API_URL", "")
        ):
            return pid, env
    raise AssertionError(f"{user}'s single-user server process not found")


def ids_of(pid: int) -> tuple[int, int, list[int]]:
    status = Path(f"/proc/{pid}/status").read_text()
    field = {k: v.split() for k, v in (line.split(":", 1) for line in status.splitlines())}
    return int(field["Uid"][0]), int(field["Gid"][0]), [int(g) for g in field["Groups"]]


def as_ids(uid: int, gid: int, groups: list[int], *argv: str) -> subprocess.CompletedProcess:
    """Run ``argv`` with the ids of a notebook (no capability, nothing of root's)."""
    who = [f"--reuid={uid}", f"--regid={gid}"]
    who.append(f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups")
    result = subprocess.run(
        ["setpriv", *who, "--", *argv], capture_output=True, timeout=30, cwd="/"
    )
    # text either way: what a user reads of a database is bytes
    result.stdout = result.stdout.decode(errors="replace")
    result.stderr = result.stderr.decode(errors="replace")
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_user_reads_nothing_of_the_state_and_the_notebook_still_works(shipped):
    platform, values, page = shipped
    state = Path(values["hub"]["state_dir"])
    storage = Path(values["spawner"]["storage_root"])

    # the files the finding named exist (the ledger's WAL once the service writes)
    secret_files = [
        "jupyterhub.sqlite",
        "accounting.sqlite",
        "accounting.sqlite-wal",
        "logs/jupyterhub.log",
        "logs/devidp.log",
        "secrets/iam-client-secret",
        "jupyterhub_cookie_secret",
    ]
    deadline = time.monotonic() + 30
    while not all((state / f).exists() for f in secret_files) and time.monotonic() < deadline:
        time.sleep(0.5)
    for name in secret_files:
        assert (state / name).is_file(), name

    # the attack: alice's notebook uid and groups read the platform's state
    pid, env = notebook_of("alice", hub_port(values))
    uid, gid, groups = ids_of(pid)
    if os.geteuid() == 0:
        assert uid >= 200000, f"alice's notebook runs as uid {uid}"
        read = {}
        for name in secret_files:
            result = as_ids(uid, gid, groups, "cat", str(state / name))
            if result.returncode == 0 or "Permission denied" not in result.stderr:
                read[name] = result.stdout[:80]
        assert not read, f"alice's uid read the platform's state: {read}"
        listing = as_ids(uid, gid, groups, "ls", str(state))
        assert listing.returncode != 0 and "Permission denied" in listing.stderr
        # nor may a uid of no user at all
        nobody = as_ids(65534, 65534, [], "cat", str(state / "jupyterhub.sqlite"))
        assert nobody.returncode != 0 and "Permission denied" in nobody.stderr

    # folders 0700, files 0600: everything under the state folder, after a login and a spawn
    assert mode(state) == 0o700
    for path in state.rglob("*"):
        if path.is_symlink():
            continue
        expected = 0o700 if path.is_dir() else 0o600
        assert mode(path) == expected, f"{path}: {oct(mode(path))}"

    # user storage lives beside the state folder, not in it
    assert not storage.is_relative_to(state)
    assert not (state / "storage").exists()
    home = Path(env["LABFLEET_HOME"])
    assert home == storage / "home" / "alice"

    # and the notebook works: its server writes into the home, as alice
    xsrf = next(c["value"] for c in page.context.cookies() if c["name"] == "_xsrf")
    response = page.request.put(
        f"{platform.url}/user/alice/api/contents/written-by-the-notebook.txt",
        data=json.dumps({"type": "file", "format": "text", "content": "still works"}),
        headers={"X-XSRFToken": xsrf, "Content-Type": "application/json"},
    )
    assert response.status == 201, response.text()
    written = home / "written-by-the-notebook.txt"
    assert written.read_text() == "still works"
    assert written.stat().st_uid == uid
    if os.geteuid() == 0:
        # what alice's uid must still read: her files, and the account names of the
        # notebooks' uids (nss_wrapper), beside the homes
        assert as_ids(uid, gid, groups, "cat", str(written)).stdout == "still works"
        passwd = as_ids(uid, gid, groups, "cat", str(storage / ".accounts" / "passwd"))
        assert passwd.returncode == 0 and f":{uid}:" in passwd.stdout, passwd.stderr


def test_no_process_shows_a_database_url_secret_or_token_on_its_command_line(shipped):
    platform, values, _page = shipped
    state = Path(values["hub"]["state_dir"])
    api = f"127.0.0.1:{hub_port(values)}/"
    proxy_api = f"{values['proxy']['api_port']}".encode()
    secrets = {
        "accounting database URL": values["accounting"]["db_url"],
        "hub database URL": values["hub"]["db_url"],
        "cookie secret": (state / "jupyterhub_cookie_secret").read_text().strip(),
    }
    # every secret labfleet generates: the IAM client's, the auth state key, ...
    for path in (state / "secrets").iterdir():
        secrets[f"secret {path.name}"] = path.read_text().strip()
    assert {"iam-client-secret", "auth-state-crypt-key"} <= {
        p.name for p in (state / "secrets").iterdir()
    }
    # the tokens the hub hands its services, the notebook and the proxy (environments)
    holders = set()
    for pid, cmdline, env in processes():
        if api in env.get("JUPYTERHUB_API_URL", "") and env.get("JUPYTERHUB_API_TOKEN"):
            who = env.get("JUPYTERHUB_SERVICE_NAME") or env.get("JUPYTERHUB_USER") or str(pid)
            holders.add(who)
            secrets[f"API token of {who}"] = env["JUPYTERHUB_API_TOKEN"]
        if b"configurable-http-proxy" in cmdline and proxy_api in cmdline:
            if env.get("CONFIGPROXY_AUTH_TOKEN"):
                holders.add("proxy")
                secrets["proxy API token"] = env["CONFIGPROXY_AUTH_TOKEN"]
    assert {"accounting", "batch", "alice", "proxy"} <= holders, holders
    assert all(len(v) >= 16 for v in secrets.values()), "a secret too short to search for"

    leaks = []
    for pid, cmdline, _env in processes():
        text = cmdline.replace(b"\0", b" ").decode(errors="replace")
        leaks += [
            f"pid {pid}: {what} in `{text[:160]}`" for what, v in secrets.items() if v in text
        ]
    assert not leaks, "\n".join(leaks)
