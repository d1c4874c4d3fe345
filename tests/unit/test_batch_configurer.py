"""The ``batch:`` section of labfleet.yaml -> a hub-managed service for users and notebooks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from labfleet_batch.service import BatchService
from labfleet_hub.configurer import (
    ConfigError,
    apply_config,
    batch_command,
    ensure_secrets,
    load_values,
    with_secrets,
)
from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[2]
ACCESS = "access:services!service=batch"


@pytest.fixture
def config_dir(tmp_path):
    for name in ("labfleet.yaml", "catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    data = yaml.safe_load((tmp_path / "labfleet.yaml").read_text())
    data["hub"]["state_dir"] = "state"
    (tmp_path / "labfleet.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def values_for(config_dir, **batch):
    path = config_dir / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    data["batch"].update(batch)
    path.write_text(yaml.safe_dump(data))
    values = load_values(path)
    ensure_secrets(values)
    return with_secrets(values)


def batch_service(c) -> dict:
    return next(s for s in c.JupyterHub.services.get_value([]) if s["name"] == "batch")


def test_bundled_config_runs_batch_next_to_accounting(config_dir):
    values = values_for(config_dir)
    port = values["batch"]["port"]
    assert 0 < port < 65536 and port != values["accounting"]["port"]
    c = Config()
    apply_config(values, c)
    service = batch_service(c)
    assert service["url"] == f"http://127.0.0.1:{port}"
    assert service["cwd"] == str(config_dir / "state")
    # the queue page is in the Services menu and signs in without a consent page
    assert service["display"] is True and service["oauth_no_confirm"] is True
    [user_role] = [r for r in c.JupyterHub.load_roles if r["name"] == "user"]
    # batch joins accounting and the IAM token scope; nothing is replaced
    assert ACCESS in user_role["scopes"]
    assert "access:services!service=accounting" in user_role["scopes"]
    assert any(s.startswith("custom:") for s in user_role["scopes"])
    # a notebook's own token may call the service, and the notebook knows where it is
    assert ACCESS in c.Spawner.server_token_scopes
    assert "access:servers!server" in c.Spawner.server_token_scopes
    assert c.Spawner.environment["LABFLEET_BATCH_URL"] == (
        f"{values['hub']['public_url']}/services/batch/"
    )


def test_command_is_understood_by_the_service(config_dir):
    values = values_for(config_dir, limits={"max_completions": 50})
    command = batch_command(values)
    assert command[1:3] == ["-m", "labfleet_batch.service"]
    app = BatchService()
    app.parse_command_line(command[3:])
    assert app.backend == "local"
    assert app.queue_config == values["batch"]["queues"]
    assert set(app.queue_config["groups"]) == {"ml", "cms"}
    assert app.limits == {"max_completions": 50}
    assert app.catalogue_path == values["catalogue"]
    assert app.storage_root == values["spawner"]["storage_root"]
    assert app.state_dir == str(config_dir / "state" / "batch")
    # the hub's ids give jobs the notebooks' uids
    assert app.job_ids_from_hub is True
    assert app.budget_db_url == ""
    # notebooks and jobs claim this machine's devices through one registry
    c = Config()
    apply_config(values, c)
    assert app.device_claims_path == str(config_dir / "state" / "device-claims.json")
    assert c.LocalGPUSpawner.device_claims_path == app.device_claims_path


def test_both_services_pages_list_the_hub_s_services_menu(config_dir):
    from labfleet_accounting.app import AccountingApp
    from labfleet_hub.configurer import accounting_command

    values = values_for(config_dir)
    c = Config()
    apply_config(values, c)
    menu = [s["name"] for s in c.JupyterHub.services.get_value([]) if s.get("display")]
    batch = BatchService()
    batch.parse_command_line(batch_command(values)[3:])
    accounting = AccountingApp()
    accounting.parse_command_line(accounting_command(values)[4:])
    assert batch.hub_services == accounting.hub_services == menu == ["accounting", "batch"]
    # without accounting, the batch page lists only itself
    data = yaml.safe_load((config_dir / "labfleet.yaml").read_text())
    data["accounting"]["enabled"] = False
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(data))
    batch = BatchService()
    batch.parse_command_line(batch_command(values_for(config_dir))[3:])
    assert batch.hub_services == ["batch"]


def test_no_isolation_means_no_hub_ids(config_dir):
    data = yaml.safe_load((config_dir / "labfleet.yaml").read_text())
    data["spawner"]["isolate_users"] = "no"
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(data))
    assert not any("job_ids_from_hub" in arg for arg in batch_command(values_for(config_dir)))


def test_budgets_read_the_accounting_database(config_dir, monkeypatch):
    values = values_for(config_dir, budgets={"enabled": True, "limit_cpu": True})
    # the URL comes through the service's environment (never its command line)
    c = Config()
    apply_config(values, c)
    for name, value in batch_service(c)["environment"].items():
        monkeypatch.setenv(name, value)
    app = BatchService()
    app.parse_command_line(batch_command(values)[3:])
    assert app.budget_db_url == values["accounting"]["db_url"]
    assert app.budget_limit_cpu is True


def test_budgets_need_accounting(config_dir):
    data = yaml.safe_load((config_dir / "labfleet.yaml").read_text())
    data["accounting"]["enabled"] = False
    data["batch"]["budgets"] = {"enabled": True}
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="batch.budgets.enabled: .*enable accounting"):
        load_values(config_dir / "labfleet.yaml")


def test_queue_layout_is_checked_against_the_catalogue(config_dir):
    with pytest.raises(ConfigError, match=r"batch.queues: groups.ml.accelerators: 'h100'"):
        values_for(config_dir, queues={"groups": {"ml": {"cpu": 1, "accelerators": {"h100": 1}}}})
    with pytest.raises(ConfigError, match="field batch.port"):
        values_for(config_dir, port=-1)


def test_disabled_batch_configures_nothing(config_dir):
    values = values_for(config_dir, enabled=False)
    c = Config()
    apply_config(values, c)
    names = [s["name"] for s in c.JupyterHub.services.get_value([])]
    assert "batch" not in names
    assert ACCESS not in c.Spawner.server_token_scopes
    # no service that could leave claims behind: the hub keeps them in memory
    assert "device_claims_path" not in c.LocalGPUSpawner
    assert "LABFLEET_BATCH_URL" not in (c.Spawner.environment if "environment" in c.Spawner else {})


def test_kubernetes_jobs_run_as_the_notebook(config_dir):
    """Kubernetes mode: the service reads hub ids and uses the spawner's bases and volume."""
    data = yaml.safe_load((config_dir / "labfleet.yaml").read_text())
    data["spawner"]["kind"] = "kubernetes"
    data["spawner"]["kubernetes"] = {
        "uid_base": 500000,
        "gid_base": 600000,
        "shared_claim": "cephfs-labfleet",
    }
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(data))
    values = values_for(config_dir)
    app = BatchService()
    app.parse_command_line(batch_command(values)[3:])
    assert app.backend == "kubernetes"
    assert app.job_ids_from_hub is True
    assert (app.uid_base, app.gid_base) == (500000, 600000)
    assert app.pod_storage == {
        "volume": {"persistentVolumeClaim": {"claimName": "cephfs-labfleet"}}
    }
    # the notebooks get the same volume and bases
    c = Config()
    apply_config(values, c)
    assert c.PlatformKubeSpawner.shared_volume == app.pod_storage["volume"]
    assert c.PlatformKubeSpawner.uid_base == 500000
    # the service (and only the service) may read users' hub ids
    [role] = [r for r in c.JupyterHub.load_roles if r["name"] == "labfleet-batch"]
    assert role == {
        "name": "labfleet-batch",
        "scopes": ["custom:labfleet:posix-ids"],
        "services": ["batch"],
    }
    [user_role] = [r for r in c.JupyterHub.load_roles if r["name"] == "user"]
    assert not any("posix-ids" in s for s in user_role["scopes"])
    assert not any("posix-ids" in s for s in c.Spawner.server_token_scopes)
    assert "custom:labfleet:posix-ids" in c.JupyterHub.custom_scopes


def test_local_jobs_are_accounted_through_the_notebooks_spool(config_dir):
    """Single node: batch jobs go into the spool the accounting service ingests (issue 9)."""
    from labfleet_accounting.app import AccountingApp
    from labfleet_hub.configurer import accounting_command

    values = values_for(config_dir)
    spool = values["accounting"]["spool"]
    assert spool == str(config_dir / "state" / "accounting.spool")
    batch = BatchService()
    batch.parse_command_line(batch_command(values)[3:])
    accounting = AccountingApp()
    accounting.parse_command_line(accounting_command(values)[4:])
    c = Config()
    apply_config(values, c)
    # one file: written by the hub's spawner hook and the batch service, read by accounting
    assert batch.accounting_spool == accounting.spool_path == spool
    assert c.LocalGPUSpawner.accounting_hook.path == spool
    # without accounting there is nobody to read it
    data = yaml.safe_load((config_dir / "labfleet.yaml").read_text())
    data["accounting"]["enabled"] = False
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(data))
    assert not any("accounting_spool" in arg for arg in batch_command(values_for(config_dir)))
    # on Kubernetes the accounting service sees the Jobs' pods itself
    data["accounting"]["enabled"] = True
    data["spawner"]["kind"] = "kubernetes"
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(data))
    assert not any("accounting_spool" in arg for arg in batch_command(values_for(config_dir)))


def test_single_node_quotas_reach_the_batch_service_with_the_accounting_token(config_dir):
    """Issue 16: the accounting service serves the quota page and changes the local
    batch limits through the batch service's API, with its own hub service token."""
    from labfleet_accounting.app import AccountingApp
    from labfleet_hub.configurer import accounting_command, batch_url

    values = values_for(config_dir)
    c = Config()
    apply_config(values, c)
    accounting = AccountingApp()
    accounting.parse_command_line(accounting_command(values)[4:])
    assert accounting.batch_limits_url == batch_url(values)
    assert accounting.batch_limits_url.endswith("/services/batch/")
    [role] = [r for r in c.JupyterHub.load_roles if r["name"] == "labfleet-accounting-limits"]
    assert role == {"name": "labfleet-accounting-limits", "scopes": [ACCESS],
                    "services": ["accounting"]}  # fmt: skip
    batch = BatchService()
    batch.parse_command_line(batch_command(values)[3:])
    assert batch.limit_managers == ["accounting"]
    # without the batch service there is nothing to manage: no URL, no role
    data = yaml.safe_load((config_dir / "labfleet.yaml").read_text())
    data["batch"]["enabled"] = False
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(data))
    values = values_for(config_dir)
    c = Config()
    apply_config(values, c)
    assert not any("batch_limits_url" in a for a in accounting_command(values))
    assert all(r["name"] != "labfleet-accounting-limits" for r in c.JupyterHub.load_roles)


def test_both_services_know_the_same_group_admins(config_dir):
    """One rule (labfleet_hub.groupadmin), one list: the accounting service's extra admins
    and the queue configuration's groups.<g>.admins reach both services."""
    from labfleet_accounting.app import AccountingApp
    from labfleet_hub.configurer import accounting_command

    path = config_dir / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    data["accounting"]["admin_group_pattern"] = "adm-{group}"
    data["accounting"]["group_admins"] = {"cms": ["dave"]}
    data["batch"]["queues"]["groups"]["ml"]["admins"] = ["erin"]
    path.write_text(yaml.safe_dump(data))
    values = values_for(config_dir)
    accounting = AccountingApp()
    accounting.parse_command_line(accounting_command(values)[4:])
    assert accounting.group_admins == {"cms": ["dave"], "ml": ["erin"]}
    assert accounting.admin_group_pattern == "adm-{group}"
    batch = BatchService()
    batch.parse_command_line(batch_command(values)[3:])
    assert batch.admin_group_pattern == "adm-{group}"
    assert batch.group_admins == {"cms": ["dave"]}  # ml's erin comes from its queue_config
    assert batch.queue_config["groups"]["ml"]["admins"] == ["erin"]
