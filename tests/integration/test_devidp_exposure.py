"""The development IdP (public demo passwords) never runs with a hub others can reach (issue 10).

``labfleet up`` and ``labfleet check-config``, as real processes, refuse a
configuration with ``devidp.enabled`` and a non-loopback ``hub.ip`` or
``hub.public_url``, or a real issuer, naming the field; nothing is started.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import write_config


@pytest.fixture
def config_dir(tmp_path):
    yield tmp_path
    values = yaml.safe_load((tmp_path / "labfleet.yaml").read_text())
    shutil.rmtree(values["spawner"]["storage_root"], ignore_errors=True)  # write_config's


def labfleet(command: str, config) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "labfleet_hub.cli", command, "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda v: v["hub"].update(ip="0.0.0.0"), "field hub.ip: '0.0.0.0' is not a loopback"),
        (
            lambda v: v["hub"].update(public_url="https://hub.example.org"),
            "field hub.public_url: 'https://hub.example.org' is not a loopback",
        ),
        (
            lambda v: v["iam"].update(issuer="https://iam.example.org/"),
            "field iam.issuer: 'https://iam.example.org/' is not the development identity",
        ),
    ],
    ids=["all-interfaces", "public-url", "real-issuer"],
)
def test_up_and_check_config_refuse_an_exposed_devidp(config_dir, change, field):
    tmp_path = config_dir
    values = write_config(tmp_path)
    change(values)
    (tmp_path / "labfleet.yaml").write_text(yaml.safe_dump(values))
    for command in ("check-config", "up"):
        result = labfleet(command, tmp_path / "labfleet.yaml")
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "invalid configuration" in result.stderr and field in result.stderr
        assert "devidp.enabled" in result.stderr
    assert not (tmp_path / "state").exists(), "nothing was started or created"


def test_the_dev_idp_with_a_loopback_hub_is_valid(config_dir):
    tmp_path = config_dir
    values = write_config(tmp_path)
    values["hub"]["ip"] = "127.0.0.2"
    port = values["devidp"]["port"]
    values["iam"]["issuer"] = f"http://localhost:{port}"
    (tmp_path / "labfleet.yaml").write_text(yaml.safe_dump(values))
    result = labfleet("check-config", tmp_path / "labfleet.yaml")
    assert result.returncode == 0, result.stderr
    # and a real issuer without the development IdP is fine too
    values["devidp"]["enabled"] = False
    values["iam"]["issuer"] = "https://iam.example.org/"
    values["hub"]["ip"] = "0.0.0.0"
    (tmp_path / "labfleet.yaml").write_text(yaml.safe_dump(values))
    assert labfleet("check-config", tmp_path / "labfleet.yaml").returncode == 0
