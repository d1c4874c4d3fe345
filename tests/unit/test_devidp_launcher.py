"""Pure helpers of the development IdP launcher (no network, no node)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from labfleet_hub import devidp


def test_import_has_no_side_effects():
    # module-level names only; nothing installed, started or read
    assert devidp.PACKAGE_DIR.name == "devidp"
    assert "NOT FOR PRODUCTION" in devidp.BANNER


def test_package_files_are_present():
    for name in ("package.json", "package-lock.json", "server.mjs"):
        assert (devidp.PACKAGE_DIR / name).is_file(), name
    pkg = json.loads((devidp.PACKAGE_DIR / "package.json").read_text())
    deps = pkg["dependencies"]
    assert deps["oidc-provider"].startswith("9.")
    assert "js-yaml" in deps
    for version in deps.values():  # pinned, as npm ci expects
        assert version[0].isdigit(), version
    lock = json.loads((devidp.PACKAGE_DIR / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/oidc-provider"]["version"] == deps["oidc-provider"]


def test_default_cache_dir():
    assert devidp.default_cache_dir({"LABFLEET_CACHE": "/x/c"}) == Path("/x/c")
    assert devidp.default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/labfleet")
    assert devidp.default_cache_dir({}) == Path.home() / ".cache" / "labfleet"


def _fake_source(tmp_path: Path, lock: str = "{}") -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "package.json").write_text('{"name": "x"}')
    (src / "package-lock.json").write_text(lock)
    (src / "server.mjs").write_text("console.log('hi')\n")
    return src


def test_lock_hash_follows_package_files(tmp_path):
    src = _fake_source(tmp_path)
    h1 = devidp.lock_hash(src)
    assert h1 == devidp.lock_hash(src) and len(h1) == 16
    (src / "server.mjs").write_text("changed")  # the script does not change the install
    assert devidp.lock_hash(src) == h1
    (src / "package-lock.json").write_text('{"v": 2}')
    assert devidp.lock_hash(src) != h1
    assert devidp.install_dir_name(src) == f"devidp-{devidp.lock_hash(src)}"


def test_lock_hash_missing_file(tmp_path):
    with pytest.raises(devidp.DevIdPError, match="package.json is missing"):
        devidp.lock_hash(tmp_path)


GOOD = {"client_id": "hub", "client_secret": "s", "redirect_uris": ["http://127.0.0.1:8000/cb"]}


def test_normalize_clients_accepts_and_copies():
    out = devidp.normalize_clients(
        [GOOD, {"client_id": "cli", "redirect_uris": "http://127.0.0.1:9/cb"}]
    )
    assert out[0] == GOOD and out[0] is not GOOD
    assert out[1] == {"client_id": "cli", "redirect_uris": ["http://127.0.0.1:9/cb"]}
    json.dumps(out)


@pytest.mark.parametrize(
    "client, message",
    [
        ({**GOOD, "client_id": ""}, "client_id must be a non-empty string"),
        ({**GOOD, "redirect_uris": []}, "redirect_uris must be a non-empty list"),
        ({**GOOD, "redirect_uris": ["ftp://x"]}, "redirect_uris must be a non-empty list"),
        ({**GOOD, "client_secret": ""}, "client_secret must be a non-empty string"),
        ({**GOOD, "scope": "openid"}, r"unknown key\(s\) \['scope'\]"),
        ({**GOOD, "token_endpoint_auth_method": "private_key_jwt"}, "is not one of"),
        (
            {
                "client_id": "c",
                "redirect_uris": ["http://a/"],
                "token_endpoint_auth_method": "client_secret_post",
            },
            "needs a client_secret",
        ),
        ("hub", "expected a mapping"),
    ],
)
def test_normalize_clients_rejects(client, message):
    with pytest.raises(devidp.DevIdPError, match=message):
        devidp.normalize_clients([client])


def test_normalize_clients_rejects_duplicates_and_single_mapping():
    with pytest.raises(devidp.DevIdPError, match="duplicate client_id 'hub'"):
        devidp.normalize_clients([GOOD, GOOD])
    with pytest.raises(devidp.DevIdPError, match="must be a list"):
        devidp.normalize_clients(GOOD)


def test_server_command(tmp_path):
    cmd = devidp.server_command(
        tmp_path,
        node="/usr/bin/node",
        host="127.0.0.1",
        port=9080,
        issuer="http://127.0.0.1:9080",
        accounts_path=Path("/a.yaml"),
        clients_path=Path("/c.json"),
        state_dir=Path("/state"),
        access_token_ttl=60,
    )
    assert cmd[:2] == ["/usr/bin/node", str(tmp_path / "server.mjs")]
    args = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert args == {
        "--host": "127.0.0.1",
        "--port": "9080",
        "--issuer": "http://127.0.0.1:9080",
        "--accounts": "/a.yaml",
        "--clients": "/c.json",
        "--state-dir": "/state",
        "--access-token-ttl": "60",
    }


def test_log_tail(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert devidp.log_tail(log, 3) == "line 97\nline 98\nline 99"
    assert devidp.log_tail(tmp_path / "missing") == ""
    assert devidp.log_tail(None) == ""


def _fake_npm(tmp_path: Path, body: str) -> str:
    npm = tmp_path / "fake-npm"
    npm.write_text(f"#!{sys.executable}\n{body}")
    npm.chmod(npm.stat().st_mode | stat.S_IXUSR)
    return str(npm)


FAKE_NPM_OK = """
import os, sys, pathlib
args = sys.argv[1:]
assert args[0] == "ci", args
prefix = pathlib.Path(args[args.index("--prefix") + 1])
assert (prefix / "package-lock.json").is_file()
(prefix / "node_modules" / "oidc-provider").mkdir(parents=True)
counter = pathlib.Path(os.environ["FAKE_NPM_COUNTER"])
counter.write_text(counter.read_text() + "x" if counter.exists() else "x")
"""


def test_ensure_installed_runs_npm_ci_once(tmp_path, monkeypatch):
    src = _fake_source(tmp_path)
    counter = tmp_path / "count"
    monkeypatch.setenv("FAKE_NPM_COUNTER", str(counter))
    npm = _fake_npm(tmp_path, FAKE_NPM_OK)
    messages: list[str] = []
    cache = tmp_path / "cache"

    target = devidp.ensure_installed(cache, npm=npm, source_dir=src, progress=messages.append)
    assert target == cache / devidp.install_dir_name(src)
    assert (target / "node_modules" / "oidc-provider").is_dir()
    assert (target / "server.mjs").read_text() == "console.log('hi')\n"
    assert any("npm ci" in m for m in messages)  # progress for the long step
    assert counter.read_text() == "x"

    # second call: no npm, but the (edited) script is refreshed
    (src / "server.mjs").write_text("console.log('v2')\n")
    again = devidp.ensure_installed(cache, npm="/nonexistent/npm", source_dir=src)
    assert again == target and counter.read_text() == "x"
    assert (target / "server.mjs").read_text() == "console.log('v2')\n"
    # no staging leftovers
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target.name]


def test_ensure_installed_reports_npm_failure(tmp_path):
    src = _fake_source(tmp_path)
    npm = _fake_npm(tmp_path, "import sys\nprint('npm ERR! boom')\nsys.exit(1)\n")
    with pytest.raises(devidp.DevIdPError, match=r"(?s)npm ci failed with exit code 1.*boom"):
        devidp.ensure_installed(
            tmp_path / "cache", npm=npm, source_dir=src, progress=lambda m: None
        )
    cache = tmp_path / "cache"
    assert not any(p.is_dir() for p in cache.iterdir())  # nothing half-installed


def test_missing_npm_gives_a_clear_error(tmp_path, monkeypatch):
    src = _fake_source(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("LABFLEET_NPM", raising=False)
    with pytest.raises(devidp.DevIdPError, match="'npm' was not found on PATH.*Node.js"):
        devidp.ensure_installed(tmp_path / "cache", source_dir=src, progress=lambda m: None)


def test_start_rejects_missing_accounts_before_anything(tmp_path):
    with pytest.raises(devidp.DevIdPError, match="accounts file .* does not exist"):
        devidp.start(port=1, accounts_path=tmp_path / "nope.yaml", cache_dir=tmp_path)
    assert not os.listdir(tmp_path)  # nothing installed


def test_demo_accounts_file():
    import yaml

    path = Path(__file__).resolve().parents[2] / "config" / "accounts.yaml"
    users = {u["username"]: u for u in yaml.safe_load(path.read_text())["users"]}
    assert users["alice"]["groups"] == ["ai-infn/users", "ai-infn/ml"]
    assert users["bob"]["groups"] == ["ai-infn/users", "ai-infn/cms"]
    assert users["carol"]["groups"] == ["ai-infn/users", "ai-infn/admins", "ai-infn/ml"]
    assert users["mallory"]["groups"] == ["other-org/users"]
    for u in users.values():
        assert u["password"] and u["email"].endswith("@example.org") and u["name"]
        assert all(not g.startswith("/") for g in u["groups"])
    assert "DEMO ONLY" in path.read_text()
