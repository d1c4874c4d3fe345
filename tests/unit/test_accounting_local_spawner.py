"""The local spawner reports starts and stops to accounting (SpoolHook), across hub restarts."""

from __future__ import annotations

import json

import pytest
from jupyterhub.objects import Hub
from jupyterhub.spawner import LocalProcessSpawner
from labfleet_accounting.spool import STATE_START, SpoolHook
from labfleet_spawner.local import LocalGPUSpawner

from tests.unit.test_local_spawner import CATALOGUE, fake_user, two_t4


class Clock:
    def __init__(self, now=1000):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch):
    """LocalProcessSpawner's process handling replaced: these tests are about the hook."""

    async def start(self):
        self.pid = 4242
        return ("127.0.0.1", 9999)

    async def stop(self, now=False):
        self.pid = 0

    monkeypatch.setattr(LocalProcessSpawner, "start", start)
    monkeypatch.setattr(LocalProcessSpawner, "stop", stop)
    LocalGPUSpawner.use_allocator(None)
    yield
    LocalGPUSpawner.use_allocator(None)


def make(tmp_path, hook, allocator=None):
    return LocalGPUSpawner(
        user=fake_user(groups=("users", "ml")),
        hub=Hub(),
        catalogue_data=CATALOGUE,
        storage_root=str(tmp_path / "srv"),
        device_allocator=allocator,
        isolate_users=False,
        allow_root_notebooks=True,  # when the tests run as root
        accounting_hook=hook,
        user_options={"profile": "gpu-t4"},
    )


def events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_start_and_stop_are_spooled_with_the_selection(tmp_path):
    clock = Clock()
    spool = tmp_path / "spool"
    spawner = make(tmp_path, SpoolHook(path=str(spool), clock=clock), two_t4())
    await spawner.start()
    assert getattr(spawner, STATE_START) == 1000
    assert spawner.get_state()[STATE_START] == 1000
    clock.now = 4600
    await spawner.stop()
    first, last = events(spool)
    assert (first["type"], first["at"], last["type"], last["at"]) == ("start", 1000, "stop", 4600)
    usage = last["usage"]
    assert (usage["user"], usage["uid"], usage["profile"]) == ("alice", "alice/", "gpu-t4")
    assert (usage["accelerator"], usage["accelerator_kind"], usage["accelerator_count"]) == (
        "t4",
        "gpu",
        1,
    )
    assert usage["kind"] == "interactive" and usage["start"] == 1000
    # the group is the user's first group when the hardware is not restricted
    assert usage["group"] == "ml"
    assert STATE_START not in spawner.get_state()
    # clear_state after stop (what User.stop does) writes no second stop
    spawner.clear_state()
    assert len(events(spool)) == 2


async def test_start_survives_a_hub_restart_and_a_dead_server_is_closed(tmp_path):
    clock = Clock()
    spool = tmp_path / "spool"
    hook = SpoolHook(path=str(spool), clock=clock)
    spawner = make(tmp_path, hook, two_t4())
    await spawner.start()
    state = spawner.get_state()
    # a new hub process: a new spawner from the saved state
    LocalGPUSpawner.use_allocator(None)
    again = make(tmp_path, hook, two_t4())
    again.load_state(state)
    assert getattr(again, STATE_START) == 1000
    clock.now = 2000
    # the server died while the hub was down: JupyterHub only clears the state
    again.clear_state()
    assert [e["type"] for e in events(spool)] == ["start", "stop"]
    assert events(spool)[1]["at"] == 2000 and events(spool)[1]["usage"]["start"] == 1000


async def test_failed_start_records_nothing(tmp_path, monkeypatch):
    async def broken(self):
        raise RuntimeError("exec failed")

    monkeypatch.setattr(LocalProcessSpawner, "start", broken)
    spool = tmp_path / "spool"
    spawner = make(tmp_path, SpoolHook(path=str(spool)), two_t4())
    with pytest.raises(RuntimeError):
        await spawner.start()
    await spawner.stop()
    spawner.clear_state()
    assert not spool.exists()


async def test_without_a_hook_nothing_is_recorded(tmp_path):
    spawner = make(tmp_path, None, two_t4())
    await spawner.start()
    assert getattr(spawner, STATE_START, None) is None
    assert STATE_START not in spawner.get_state()
    await spawner.stop()
    assert list(tmp_path.iterdir()) == [tmp_path / "srv"]
