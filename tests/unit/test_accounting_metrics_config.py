"""The accounting service's /metrics are closed by default (issue 10): labfleet up generates
a bearer token, gives the service its file (never the token on a command line), and
``labfleet prometheus-config`` hands the same file to Prometheus."""

from __future__ import annotations

import yaml
from labfleet_accounting.app import AccountingApp
from labfleet_hub.cli import main
from labfleet_hub.configurer import (
    accounting_command,
    ensure_secrets,
    gpu_exporter_token_path,
    load_values,
    metrics_token_path,
    prometheus_config,
    with_secrets,
)


def edit(path, change):
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def values_for(config_dir):
    edit(config_dir / "labfleet.yaml", lambda d: d["hub"].update(state_dir="state"))
    return load_values(config_dir / "labfleet.yaml")


def test_a_token_is_generated_and_its_file_given_to_the_service(config_dir):
    values = values_for(config_dir)
    ensure_secrets(values)
    token_file = metrics_token_path(values)
    assert token_file == config_dir / "state" / "secrets" / "accounting-metrics-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64
    # the hub does not read it: a hub whose state folder lacks it still starts
    assert "metrics_token" not in with_secrets(values)["secrets"]
    command = accounting_command(values)
    assert f"--AccountingApp.metrics_token_file={token_file}" in command
    assert not any(token in arg for arg in command), "the token itself is never on a command line"
    app = AccountingApp()
    app.parse_command_line(command[4:])
    assert app.metrics_token_file == str(token_file) and app.metrics_public is False


def test_metrics_public_opens_them_deliberately(config_dir):
    edit(config_dir / "labfleet.yaml", lambda d: d["accounting"].update(metrics_public=True))
    values = values_for(config_dir)
    command = accounting_command(values)
    assert "--AccountingApp.metrics_public=True" in command
    assert not any("metrics_token" in arg for arg in command)
    job, exporter = prometheus_config(values)["scrape_configs"]
    assert "authorization" not in job
    # the accounting switch does not open the GPU exporter
    assert exporter["authorization"]["credentials_file"] == str(gpu_exporter_token_path(values))


def test_prometheus_scrapes_through_the_proxy_with_the_token_file(config_dir):
    edit(config_dir / "labfleet.yaml", lambda d: d["hub"].update(base_url="/jh/"))
    values = values_for(config_dir)
    job, exporter = prometheus_config(values)["scrape_configs"]
    assert exporter == {
        "job_name": "labfleet-gpu-exporter",
        "static_configs": [{"targets": ["127.0.0.1:9835"]}],
        "authorization": {
            "type": "Bearer",
            "credentials_file": str(
                config_dir / "state" / "secrets" / "gpu-exporter-metrics-token"
            ),
        },
    }
    assert job == {
        "job_name": "labfleet-accounting",
        "scheme": "http",
        "metrics_path": "/jh/services/accounting/metrics",
        "static_configs": [{"targets": ["127.0.0.1:8000"]}],
        "authorization": {"type": "Bearer", "credentials_file": str(metrics_token_path(values))},
    }


def test_labfleet_prometheus_config_prints_it(config_dir, capsys):
    values_for(config_dir)
    config = str(config_dir / "labfleet.yaml")
    argv = ["prometheus-config", "--config", config, "--token-file", "/etc/p/t"]
    assert main([*argv, "--exporter-token-file", "/etc/p/g"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    job, exporter = printed["scrape_configs"]
    assert job["authorization"]["credentials_file"] == "/etc/p/t"
    assert exporter["authorization"]["credentials_file"] == "/etc/p/g"


def test_the_gpu_exporter_gets_a_token_of_its_own(config_dir):
    values = values_for(config_dir)
    ensure_secrets(values)
    path = gpu_exporter_token_path(values)
    assert path == config_dir / "state" / "secrets" / "gpu-exporter-metrics-token"
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    assert len(token) == 64 and token != metrics_token_path(values).read_text().strip()
    ensure_secrets(values)  # a second `labfleet up` keeps it
    assert path.read_text().strip() == token


def test_kubernetes_mode_has_no_static_exporter_job(config_dir):
    edit(config_dir / "labfleet.yaml", lambda d: d["spawner"].update(kind="kubernetes"))
    values = values_for(config_dir)
    [job] = prometheus_config(values)["scrape_configs"]  # the DaemonSet is scraped per pod
    assert job["job_name"] == "labfleet-accounting"
