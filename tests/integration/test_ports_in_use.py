"""A server that cannot bind its port says so, instead of trusting whoever answers there."""

import socket
import subprocess
import sys

import pytest
from labfleet_hub import devidp

from .conftest import ROOT, write_config


@pytest.fixture
def busy_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_devidp_refuses_a_busy_port(busy_port):
    with pytest.raises(
        devidp.DevIdPError, match=f"port {busy_port} on 127.0.0.1 is already in use"
    ):
        devidp.start(port=busy_port, accounts_path=ROOT / "config" / "accounts.yaml")


def test_labfleet_up_refuses_busy_hub_port(tmp_path, busy_port):
    import yaml

    values = write_config(tmp_path)
    values["hub"]["port"] = busy_port
    (tmp_path / "labfleet.yaml").write_text(yaml.safe_dump(values))
    command = [sys.executable, "-m", "labfleet_hub.cli", "up", "--config"]
    result = subprocess.run(
        [*command, str(tmp_path / "labfleet.yaml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert f"port(s) {busy_port} already in use" in result.stderr
    assert not (tmp_path / "state").exists()
