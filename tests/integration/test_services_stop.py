"""Stopping the platform stops its services cleanly: exit 0, no traceback in the hub's log.

JupyterHub stops its managed services with SIGINT (then SIGTERM after a
grace period), and Ctrl-C at ``labfleet up`` reaches the whole platform. The
services run here as the hub runs them (``JUPYTERHUB_SERVICE_NAME`` set, so
``die_with_hub`` applies), without a hub: they only have to start and stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

from .conftest import start_platform, stop_platform, write_config

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "config" / "catalogue.yaml"


def batch_command(tmp_path: Path) -> list[str]:
    queues = tmp_path / "queues.yaml"
    queues.write_text(yaml.safe_dump({"groups": {"ml": {"cpu": 4, "memory": "8Gi"}}}))
    storage = tmp_path / "storage"
    storage.mkdir()
    return [
        sys.executable, "-m", "labfleet_batch.service",
        f"--BatchService.catalogue_path={CATALOGUE}",
        f"--BatchService.queues_path={queues}",
        "--BatchService.backend=local",
        f"--BatchService.storage_root={storage}",
        f"--BatchService.state_dir={tmp_path / 'state'}",
    ]  # fmt: skip


def accounting_command(tmp_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "labfleet_accounting.app", "serve",
        f"--AccountingApp.db_url=sqlite:///{tmp_path / 'accounting.sqlite'}",
        f"--AccountingApp.spool_path={tmp_path / 'accounting.spool'}",
    ]  # fmt: skip


SERVICES = {
    # name: (command builder, a path the running service answers)
    "batch": (batch_command, "health"),
    "accounting": (accounting_command, "metrics"),
}


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer: it is serving
    except OSError:
        return False


@pytest.mark.parametrize("name", sorted(SERVICES))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_service_stops_cleanly_on_signal(tmp_path, name, sig):
    build, path = SERVICES[name]
    port = free_port()
    prefix = f"/services/{name}/"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")},
        "JUPYTERHUB_SERVICE_NAME": name,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_SERVICE_PREFIX": prefix,
        "JUPYTERHUB_API_TOKEN": "unused",
        "JUPYTERHUB_API_URL": f"http://127.0.0.1:{free_port()}/hub/api",
    }
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            build(tmp_path), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:
        deadline = time.monotonic() + 60
        while not answers(f"http://127.0.0.1:{port}{prefix}{path}"):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{name} did not start:\n{log.read_text()}"
            time.sleep(0.2)
        process.send_signal(sig)
        code = process.wait(20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert code == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output


def test_ctrl_c_stops_the_platform_without_tracebacks(tmp_path):
    """Ctrl-C at `labfleet up`: SIGINT to its process group; everything it ran stops quietly."""
    config_dir = tmp_path / "platform"
    values = write_config(config_dir)
    running = start_platform(config_dir)
    try:
        hub_log = running.state_dir / "logs" / "jupyterhub.log"
        # the hub has started both services (they answer through the proxy)
        for service in ("batch", "accounting"):
            deadline = time.monotonic() + 60
            while not answers(f"{running.url}/services/{service}/"):
                assert time.monotonic() < deadline, f"{service} not up:\n{hub_log.read_text()}"
                time.sleep(0.3)
        os.killpg(running.process.pid, signal.SIGINT)
        code = running.process.wait(60)
    finally:
        stop_platform(running.process)
        shutil.rmtree(values["spawner"]["storage_root"], ignore_errors=True)
    output = hub_log.read_text() + running.log.read_text()
    assert code == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
