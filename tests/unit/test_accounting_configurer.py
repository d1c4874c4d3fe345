"""The ``accounting:`` section of labfleet.yaml -> a hub-managed service and the spawner hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from labfleet_accounting.app import ServeApp
from labfleet_accounting.spool import SpoolHook
from labfleet_hub.configurer import (
    ConfigError,
    accounting_command,
    apply_config,
    ensure_secrets,
    load_values,
    with_secrets,
)
from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_dir(config_dir):
    tmp_path = config_dir
    data = yaml.safe_load((tmp_path / "labfleet.yaml").read_text())
    data["hub"]["state_dir"] = "state"
    (tmp_path / "labfleet.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def services(c) -> list[dict]:
    """The services as JupyterHub will see them (apply_config appends lazily)."""
    return c.JupyterHub.services.get_value([])


def values_for(config_dir, **accounting):
    path = config_dir / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    data["accounting"].update(accounting)
    path.write_text(yaml.safe_dump(data))
    values = load_values(path)
    ensure_secrets(values)
    return with_secrets(values)


def test_bundled_config_runs_the_service_on_a_free_port_with_sqlite(config_dir):
    values = values_for(config_dir)
    acc = values["accounting"]
    state = config_dir / "state"
    assert acc["enabled"] is True
    assert acc["db_url"] == f"sqlite:///{state / 'accounting.sqlite'}"
    assert acc["spool"] == str(state / "accounting.spool")
    assert 0 < acc["port"] < 65536
    c = Config()
    apply_config(values, c)
    service = next(s for s in services(c) if s["name"] == "accounting")
    assert service["name"] == "accounting"
    assert service["url"] == f"http://127.0.0.1:{acc['port']}"
    assert service["display"] is True and service["oauth_no_confirm"] is True
    assert "access:services!service=accounting" in c.JupyterHub.load_roles[0]["scopes"]
    # the IAM token scope of the user role is kept
    assert any(s.startswith("custom:") for s in c.JupyterHub.load_roles[0]["scopes"])
    hook = c.LocalGPUSpawner.accounting_hook
    assert isinstance(hook, SpoolHook) and hook.path == acc["spool"]


def test_service_command_is_understood_by_the_service(config_dir, monkeypatch):
    values = values_for(config_dir, port=10123, group_admins={"ml": ["carol"]})
    command = accounting_command(values)
    assert command[1:4] == ["-m", "labfleet_accounting.app", "serve"]
    # the database URL comes through the service's environment, as the hub starts it
    c = Config()
    apply_config(values, c)
    for name, value in next(s for s in services(c) if s["name"] == "accounting")[
        "environment"
    ].items():
        monkeypatch.setenv(name, value)
    app = ServeApp()
    app.parse_command_line(command[4:])
    app.update_config(app.config)
    assert app.db_url == values["accounting"]["db_url"]
    assert app.spool_path == values["accounting"]["spool"]
    assert app.group_admins == {"ml": ["carol"]}
    assert app.kubernetes is False
    assert app.catalogue().accelerators["t4"].kind == "gpu"
    c = Config()
    apply_config(values, c)
    assert (
        next(s for s in services(c) if s["name"] == "accounting")["url"] == "http://127.0.0.1:10123"
    )


def test_disabled_accounting_configures_nothing(config_dir):
    values = values_for(config_dir, enabled=False)
    c = Config()
    apply_config(values, c)
    assert "services" not in c.JupyterHub or "accounting" not in {s["name"] for s in services(c)}
    assert "accounting_hook" not in c.LocalGPUSpawner
    user_scopes = c.JupyterHub.load_roles[0]["scopes"]
    assert not [scope for scope in user_scopes if scope.endswith("service=accounting")]


def test_kubernetes_mode_runs_the_kubernetes_collector_and_no_spool_hook(config_dir):
    values = values_for(config_dir)
    values["spawner"]["kind"] = "kubernetes"
    command = accounting_command(values)
    assert "--AccountingApp.kubernetes=True" in command
    assert not any(a.startswith("--AccountingApp.spool_path") for a in command)
    c = Config()
    apply_config(values, c)
    assert "accounting_hook" not in c.LocalGPUSpawner


def test_quota_page_patches_the_clusterqueues_the_batch_layout_names(config_dir):
    from labfleet_accounting.app import AccountingApp
    from labfleet_batch.queues import parse_queue_config
    from labfleet_spawner.catalogue import load_catalogue

    values = values_for(config_dir)
    values["spawner"]["kind"] = "kubernetes"
    values["batch"]["queues"]["name_prefix"] = "site-a-"
    app = AccountingApp()
    app.parse_command_line(accounting_command(values)[4:])
    assert app.queue_name_prefix == "site-a-"
    layout = parse_queue_config(values["batch"]["queues"], load_catalogue(values["catalogue"]))
    assert f"{app.queue_name_prefix}ml" == layout.cluster_queue("ml")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"port": 70000}, "accounting.port"),
        ({"admin_group_pattern": "admins"}, "accounting.admin_group_pattern"),
        ({"group_admins": {"Bad Group": ["x"]}}, "accounting.group_admins"),
        ({"mig_weighting": "half"}, "accounting.mig_weighting"),
        ({"colour": "red"}, "accounting"),
    ],
)
def test_invalid_accounting_section_names_the_field(config_dir, change, field):
    with pytest.raises(ConfigError) as info:
        values_for(config_dir, **change)
    assert f"field {field}" in str(info.value)
