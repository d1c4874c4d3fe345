"""Fail closed (issue 10): users' notebooks and jobs run under their own uids, or not at all,
unless the admin says this is a single-user installation (``isolate_users: no``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from labfleet_batch.local import LocalBackend
from labfleet_batch.queues import parse_queue_config
from labfleet_batch.service import BatchService
from labfleet_hub.configurer import apply_config, batch_command, parse_values
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.devices import DeviceAllocator
from labfleet_spawner.isolation import IsolationRefused, decide
from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["auto", "yes"])
def test_isolate_when_possible(mode):
    assert decide(mode, uid=0, can_isolate=True) is True


@pytest.mark.parametrize("mode", ["auto", "yes"])
def test_not_root_is_refused_never_run_as_the_hub_user(mode):
    with pytest.raises(IsolationRefused) as refused:
        decide(mode, uid=1000, what="notebooks")
    message = str(refused.value)
    assert "runs as uid 1000, not root" in message
    assert "Run labfleet as root" in message and "spawner.isolate_users: no" in message


def test_root_whose_check_fails_is_refused_never_runs_as_root():
    with pytest.raises(IsolationRefused) as refused:
        decide("auto", uid=0, can_isolate=False, why_not="uid 100000 cannot run /opt/py")
    message = str(refused.value)
    assert "uid 100000 cannot run /opt/py" in message and "Nothing runs as root" in message


def test_no_runs_as_the_hub_user_and_as_root_only_when_acknowledged():
    assert decide("no", uid=1000) is False
    with pytest.raises(IsolationRefused, match="spawner.allow_root_notebooks: true"):
        decide("no", uid=0)
    assert decide("no", uid=0, allow_root=True) is False


def test_unknown_mode():
    with pytest.raises(ValueError, match="not one of auto, yes, no"):
        decide("maybe", uid=0)


def queue_config():
    catalogue = load_catalogue(ROOT / "config" / "catalogue.yaml")
    return parse_queue_config({"groups": {"ml": {"cpu": 1, "memory": "1Gi"}}}, catalogue)


def test_local_batch_backend_decides_the_same(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    refused = LocalBackend(queue_config(), "/nonexistent", allocator=DeviceAllocator([]))
    assert refused.isolate is False and "not root" in refused.refusal
    single = LocalBackend(
        queue_config(), "/nonexistent", allocator=DeviceAllocator([]), isolate_users="no"
    )
    assert single.isolate is False and single.refusal == ""
    monkeypatch.setattr("os.geteuid", lambda: 0)
    root = LocalBackend(
        queue_config(), "/nonexistent", allocator=DeviceAllocator([]), isolate_users="no"
    )
    assert "allow_root_notebooks" in root.refusal
    acknowledged = LocalBackend(
        queue_config(), "/nonexistent", allocator=DeviceAllocator([]), isolate_users="no",
        allow_root=True,
    )  # fmt: skip
    assert acknowledged.isolate is False and acknowledged.refusal == ""


async def test_refused_backend_creates_nothing(monkeypatch, tmp_path):
    from labfleet_batch.validation import Limits, validate_request

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    catalogue = load_catalogue(ROOT / "config" / "catalogue.yaml")
    config = queue_config()
    backend = LocalBackend(config, str(tmp_path), allocator=DeviceAllocator([]))
    request = validate_request(
        {"command": ["id"]}, catalogue=catalogue, user_groups=["ml"],
        queue_groups=config.covered_accelerators(), priorities=config.priorities,
        limits=Limits(),
    )  # fmt: skip
    with pytest.raises(IsolationRefused, match="not root"):
        await backend.submit(request, "alice")
    assert list(tmp_path.iterdir()) == []
    assert await backend.list_jobs(["ml"]) == []


@pytest.fixture
def data(tmp_path):
    for name in ("catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    return yaml.safe_load((ROOT / "config" / "labfleet.yaml").read_text())


def configured(data, tmp_path):
    values = parse_values(data, "x.yaml", tmp_path)
    c = Config()
    apply_config({**values, "secrets": {"client_secret": "s", "crypt_key": "k"}}, c)
    batch = BatchService()
    batch.parse_command_line(batch_command(values)[3:])
    return c.LocalGPUSpawner, batch


def test_platform_yaml_reaches_spawner_and_batch_service(data, tmp_path):
    spawner, batch = configured(data, tmp_path)
    assert spawner.isolate_users == "auto" and spawner.allow_root_notebooks is False
    assert batch.isolate_users == "auto" and batch.job_ids_from_hub is True
    assert batch.allow_root_jobs is False
    data["spawner"].update(isolate_users="no", allow_root_notebooks=True)
    spawner, batch = configured(data, tmp_path)
    assert spawner.isolate_users is False and spawner.allow_root_notebooks is True
    assert batch.isolate_users == "no" and batch.job_ids_from_hub is False
    assert batch.allow_root_jobs is True
