"""The platform's state is its own, and its secrets stay off command lines (issue 10).

``labfleet_hub.private`` makes ``hub.state_dir`` 0700 with 0600 files before
``labfleet up`` starts anything; the configurer refuses user storage inside
it; database URLs reach the services through their environment, never their
command lines (``ps`` shows those to every local user).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from labfleet_hub.configurer import (
    ConfigError,
    apply_config,
    ensure_secrets,
    load_values,
    with_secrets,
)
from labfleet_hub.private import (
    ACCOUNTING_DB_URL_ENV,
    BUDGET_DB_URL_ENV,
    HUB_DB_URL_ENV,
    StateError,
    prepare_state_dir,
    sqlite_path,
)
from traitlets.config import Config

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-Pa55word"
PG_URL = f"postgresql+psycopg://labfleet:{PASSWORD}@db.example.org:5432/accounting"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def edit(config_dir: Path, change) -> Path:
    path = config_dir / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # what an administrator's shell usually has
    yield
    os.umask(old)


# -- where user storage lives ------------------------------------------------


def test_bundled_default_keeps_user_storage_beside_the_state_folder():
    values = load_values(ROOT / "config" / "labfleet.yaml")
    state = Path(values["hub"]["state_dir"])
    storage = Path(values["spawner"]["storage_root"])
    assert state == ROOT / ".labfleet"
    assert storage == ROOT / ".labfleet-storage"
    assert not storage.is_relative_to(state)


def test_configurer_default_storage_root_is_outside_the_state_folder(config_dir):
    def defaults(data):
        del data["hub"]["state_dir"], data["spawner"]["storage_root"]

    values = load_values(edit(config_dir, defaults))
    assert values["hub"]["state_dir"] == str(config_dir / ".labfleet")
    assert values["spawner"]["storage_root"] == str(config_dir / ".labfleet-storage")


@pytest.mark.parametrize(
    "state_dir, storage_root, field, other",
    [
        ("state", "state/storage", "spawner.storage_root", "hub.state_dir"),
        ("state", "state", "spawner.storage_root", "hub.state_dir"),
        ("state", "state/./deep/../home", "spawner.storage_root", "hub.state_dir"),
        ("storage/state", "storage", "hub.state_dir", "spawner.storage_root"),
    ],
)
def test_storage_and_state_inside_each_other_are_refused(
    config_dir, state_dir, storage_root, field, other
):
    def layout(data):
        data["hub"]["state_dir"] = state_dir
        data["spawner"]["storage_root"] = storage_root

    with pytest.raises(ConfigError) as e:
        load_values(edit(config_dir, layout))
    message = str(e.value)
    assert f"field {field}:" in message and other in message
    assert str(config_dir / "labfleet.yaml") in message


def test_spool_in_user_storage_is_refused(config_dir):
    def spool(data):
        data["accounting"]["spool"] = "../.labfleet-storage/public/accounting.spool"

    with pytest.raises(ConfigError, match="field accounting.spool: .* spawner.storage_root"):
        load_values(edit(config_dir, spool))


def test_kubernetes_mode_has_no_storage_root_to_check(config_dir):
    def kube(data):
        data["hub"]["state_dir"] = "state"
        data["spawner"] = {"kind": "kubernetes", "storage_root": "state/storage"}
        data["batch"]["enabled"] = False

    load_values(edit(config_dir, kube))


def labfleet(command: str, config: Path) -> subprocess.CompletedProcess:
    """The real command; a timeout, not a hang, where ``up`` would start the platform."""
    return subprocess.run(
        [sys.executable, "-m", "labfleet_hub.cli", command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def free_ports(data: dict) -> None:
    data["hub"].update(port=free_port(), hub_port=free_port())
    data["proxy"] = {"api_port": free_port()}
    data["devidp"]["port"] = free_port()
    data["iam"]["issuer"] = f"http://127.0.0.1:{data['devidp']['port']}/"


@pytest.mark.parametrize("command", ["check-config", "up"])
def test_cli_refuses_storage_in_state_naming_both_fields(config_dir, command):
    def layout(data):
        free_ports(data)
        data["hub"]["state_dir"] = "state"
        data["spawner"]["storage_root"] = "state/storage"

    result = labfleet(command, edit(config_dir, layout))
    assert result.returncode == 1
    assert "field spawner.storage_root:" in result.stderr and "hub.state_dir" in result.stderr
    assert not (config_dir / "state").exists()  # `up` started nothing, created nothing


# -- the state folder's modes -------------------------------------------------


def values_with_state(config_dir) -> dict:
    def layout(data):
        data["hub"]["state_dir"] = "state"

    return load_values(edit(config_dir, layout))


def test_fresh_state_folder_is_private_from_the_first_byte(config_dir, umask_022):
    values = values_with_state(config_dir)
    prepare_state_dir(values)
    ensure_secrets(values)
    state = config_dir / "state"
    for folder in (state, state / "logs", state / "secrets", state / "batch"):
        assert mode(folder) == 0o700, folder
    for name in (
        "jupyterhub.sqlite",
        "accounting.sqlite",
        "accounting.spool",
        "logs/jupyterhub.log",
        "logs/devidp.log",
        "secrets/iam-client-secret",
        "secrets/auth-state-crypt-key",
        "secrets/accounting-metrics-token",
        "secrets/gpu-exporter-metrics-token",
    ):
        assert mode(state / name) == 0o600, name


def test_databases_journals_and_wal_files_take_the_database_s_mode(config_dir, umask_022):
    from labfleet_accounting import db

    values = values_with_state(config_dir)
    prepare_state_dir(values)
    engine = db.make_engine(values["accounting"]["db_url"])  # WAL, as the service
    db.upgrade(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1").fetchall()
        state = config_dir / "state"
        wal = sorted(p.name for p in state.glob("accounting.sqlite-*"))
        assert wal == ["accounting.sqlite-shm", "accounting.sqlite-wal"]
        for name in wal:
            assert mode(state / name) == 0o600, name
    engine.dispose()
    hub_db = sqlite_path(values["hub"]["db_url"])
    conn = sqlite3.connect(hub_db)  # rollback journal, as JupyterHub's
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (1)")
    assert mode(Path(f"{hub_db}-journal")) == 0o600
    conn.rollback()
    conn.close()


def test_batch_job_store_and_its_wal_are_private(tmp_path, umask_022):
    from labfleet_batch.store import JobStore

    store = JobStore(tmp_path / "batch")
    store._conn.execute("INSERT INTO jobs (grp, name, record) VALUES ('ml', 'j', '{}')")
    assert mode(tmp_path / "batch") == 0o700
    names = sorted(p.name for p in (tmp_path / "batch").iterdir())
    assert names == ["jobs.sqlite", "jobs.sqlite-shm", "jobs.sqlite-wal"]
    for name in names:
        assert mode(tmp_path / "batch" / name) == 0o600, name


def test_state_left_readable_by_an_earlier_version_is_tightened(config_dir, tmp_path_factory):
    values = values_with_state(config_dir)
    state = config_dir / "state"
    outside = tmp_path_factory.mktemp("outside") / "not-ours"
    outside.write_text("an administrator's file")
    outside.chmod(0o644)
    for folder in (state, state / "logs", state / "batch", state / "secrets", state / "other"):
        folder.mkdir(mode=0o755, exist_ok=True)
        folder.chmod(0o755)
    for name in (
        "jupyterhub.sqlite",
        "accounting.sqlite",
        "accounting.sqlite-wal",
        "accounting.spool",
        "device-claims.json",
        "jupyterhub-proxy.pid",
        "logs/jupyterhub.log",
        "logs/devidp.log",
        "batch/jobs.sqlite",
        "secrets/iam-client-secret",
    ):
        (state / name).write_text("x")
        (state / name).chmod(0o644)
    (state / "link").symlink_to(outside)
    os.mkfifo(state / "fifo", 0o644)

    changed = prepare_state_dir(values)

    assert state in changed and state / "logs" / "jupyterhub.log" in changed
    for folder in (state, state / "logs", state / "batch", state / "secrets"):
        assert mode(folder) == 0o700, folder
    # the state folder's own 0700 keeps users out of folders labfleet does not know
    assert mode(state / "other") == 0o755
    for path in state.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.parent != state / "other":
            assert mode(path) == 0o600, path
    # nothing is changed through a link, and a FIFO neither blocks nor changes
    assert mode(outside) == 0o644
    assert stat.S_ISFIFO(os.lstat(state / "fifo").st_mode)
    # a second run has nothing left to do
    assert prepare_state_dir(values) == []


def test_user_storage_of_an_earlier_version_is_not_hidden_silently(config_dir):
    values = values_with_state(config_dir)
    state = config_dir / "state"
    home = state / "storage" / "home" / "alice"
    home.mkdir(parents=True)
    state.chmod(0o755)
    with pytest.raises(StateError) as e:
        prepare_state_dir(values)
    message = str(e.value)
    assert f"mv {state / 'storage'} {values['spawner']['storage_root']}" in message
    assert "spawner.storage_root" in message and "hub.state_dir" in message
    assert mode(state) == 0o755  # refused before changing anything
    # an empty leftover is simply removed
    home.rmdir()
    home.parent.rmdir()
    prepare_state_dir(values)
    assert not (state / "storage").exists()


def test_cli_up_stops_at_old_user_storage(config_dir):
    edit(config_dir, free_ports)  # the port check comes first
    values = values_with_state(config_dir)
    (Path(values["hub"]["state_dir"]) / "storage" / "home").mkdir(parents=True)
    result = labfleet("up", config_dir / "labfleet.yaml")
    assert result.returncode == 1
    assert "holds user storage" in result.stderr
    assert "starting" not in result.stdout


# -- secrets off command lines -------------------------------------------------


def platform_values(config_dir, **change) -> dict:
    def secrets(data):
        data["hub"]["state_dir"] = "state"
        data["hub"]["db_url"] = f"postgresql+psycopg://hub:{PASSWORD}-hub@db.example.org/hub"
        data["accounting"]["db_url"] = PG_URL
        data["batch"]["budgets"] = {"enabled": True}
        for section, fields in change.items():
            data.setdefault(section, {}).update(fields)

    values = load_values(edit(config_dir, secrets))
    ensure_secrets(values)
    return with_secrets(values)


@pytest.mark.parametrize("kind", ["local", "kubernetes"])
def test_no_service_command_line_holds_a_secret(config_dir, kind, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    values = platform_values(config_dir, spawner={"kind": kind})
    c = Config()
    apply_config(values, c)
    services = c.JupyterHub.services.get_value([])
    assert {s["name"] for s in services} == {"accounting", "batch"}
    secrets = [PASSWORD, PG_URL, values["hub"]["db_url"], *values["secrets"].values()]
    secrets += [p.read_text().strip() for p in (config_dir / "state" / "secrets").iterdir()]
    for service in services:
        for arg in service["command"]:
            for secret in secrets:
                assert secret not in arg, (service["name"], arg)
        assert "db_url" not in " ".join(service["command"])
    env = {s["name"]: s["environment"] for s in services}
    assert env["accounting"][ACCOUNTING_DB_URL_ENV] == PG_URL
    assert env["batch"][BUDGET_DB_URL_ENV] == PG_URL
    if kind == "kubernetes":  # the cluster's credentials still reach both
        assert env["accounting"]["KUBECONFIG"] == env["batch"]["KUBECONFIG"]


def test_without_budgets_the_batch_service_gets_no_database(config_dir):
    values = platform_values(config_dir, batch={"budgets": {"enabled": False}})
    c = Config()
    apply_config(values, c)
    [batch] = [s for s in c.JupyterHub.services.get_value([]) if s["name"] == "batch"]
    assert BUDGET_DB_URL_ENV not in batch["environment"]


def test_services_read_database_urls_from_their_environment(monkeypatch):
    from labfleet_accounting.app import AccountingApp, GpuExporterApp, ServeApp
    from labfleet_batch.service import BatchService

    for name in (ACCOUNTING_DB_URL_ENV, BUDGET_DB_URL_ENV, HUB_DB_URL_ENV):
        monkeypatch.delenv(name, raising=False)
    assert AccountingApp().db_url == "sqlite:///labfleet-accounting.sqlite"
    assert BatchService().budget_db_url == ""
    assert GpuExporterApp().hub_db_url == ""
    monkeypatch.setenv(ACCOUNTING_DB_URL_ENV, PG_URL)
    monkeypatch.setenv(BUDGET_DB_URL_ENV, PG_URL + "-budget")
    monkeypatch.setenv(HUB_DB_URL_ENV, "sqlite:////var/lib/labfleet/jupyterhub.sqlite")
    assert ServeApp().db_url == PG_URL
    assert BatchService().budget_db_url == PG_URL + "-budget"
    exporter = GpuExporterApp()
    assert exporter.db_url == PG_URL
    assert exporter.hub_db_url == "sqlite:////var/lib/labfleet/jupyterhub.sqlite"
    # given explicitly (a config file, or the command line of a test), it still wins
    app = ServeApp()
    app.parse_command_line(["--AccountingApp.db_url=sqlite:///other.sqlite"])
    assert app.db_url == "sqlite:///other.sqlite"
