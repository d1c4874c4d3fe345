"""Device claims shared between processes (the hub and the local batch service).

Two allocators on one ``claims_path`` stand for the two processes; the race
test runs two real OS processes against one registry file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from labfleet_batch.local import LocalBackend
from labfleet_batch.queues import parse_queue_config
from labfleet_spawner.catalogue import Accelerator, load_catalogue
from labfleet_spawner.devices import ClaimsFile, DeviceAllocator, DeviceClaimsError, NoFreeDevice
from labfleet_spawner.nvml import GpuDevice

T4 = Accelerator("t4", "gpu", "nvidia.com/gpu", "NVIDIA Tesla T4", nvml_models=("Tesla T4",))
REPO = Path(__file__).resolve().parents[2]


def t4s(n: int = 2) -> list[GpuDevice]:
    return [GpuDevice(i, f"GPU-t4-{i}", "Tesla T4") for i in range(n)]


def hub_and_batch(path, n: int = 2) -> tuple[DeviceAllocator, DeviceAllocator]:
    """The two processes' allocators: same devices, same registry, different components."""
    hub = DeviceAllocator(t4s(n), claims_path=path, component="notebooks")
    batch = DeviceAllocator(t4s(n), claims_path=path, component="batch")
    return hub, batch


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state" / "device-claims.json"


def test_two_allocators_never_hand_out_the_same_device(path):
    hub, batch = hub_and_batch(path)
    alice = hub.allocate("alice/", T4)
    job = batch.allocate("batch:ml/train-1", T4)
    assert {d.uuid for d in alice} == {"GPU-t4-0"} and {d.uuid for d in job} == {"GPU-t4-1"}
    # each side sees the other's claim, by owner, and counts it as taken
    assert hub.owner_of("GPU-t4-1") == "batch:ml/train-1"
    assert batch.owner_of("GPU-t4-0") == "alice/"
    assert hub.free_and_total(T4) == batch.free_and_total(T4) == (0, 2)
    assert hub.availability([T4]) == {"t4": (0, 2)}
    # the refusal is the usual sentence for the user, whoever holds the devices
    with pytest.raises(NoFreeDevice) as refused:
        hub.allocate("bob/", T4)
    assert str(refused.value) == (
        "no NVIDIA Tesla T4 is free: 2 in total, all in use; try another profile or later"
    )
    batch.release("batch:ml/train-1")
    with pytest.raises(NoFreeDevice, match=r"only 1 of 2 are free"):
        batch.allocate("batch:ml/train-2", T4, 2)  # all-or-nothing across processes too
    assert batch.held_by("batch:ml/train-2") == [] and hub.free_and_total(T4) == (1, 2)


def test_release_frees_the_device_for_the_other_process(path):
    hub, batch = hub_and_batch(path, n=1)
    batch.allocate("batch:ml/train-1", T4)
    with pytest.raises(NoFreeDevice):
        hub.allocate("alice/", T4)
    assert batch.release("batch:ml/train-1") == ["GPU-t4-0"]
    assert [d.uuid for d in hub.allocate("alice/", T4)] == ["GPU-t4-0"]
    assert batch.free_and_total(T4) == (0, 1)


def test_a_component_frees_only_its_own_claims(path):
    hub, batch = hub_and_batch(path)
    batch.allocate("batch:ml/x", T4)
    # an owner string that happens to equal the other side's is still not the same claim
    assert hub.release("batch:ml/x") == []
    assert hub.held_by("batch:ml/x") == [] and [d.uuid for d in batch.held_by("batch:ml/x")] == [
        "GPU-t4-0"
    ]
    hub.allocate("batch:ml/x", T4)  # supersedes only the hub's own allocation of that name
    assert batch.owner_of("GPU-t4-0") == batch.owner_of("GPU-t4-1") == "batch:ml/x"
    assert [d.uuid for d in batch.held_by("batch:ml/x")] == ["GPU-t4-0"]
    restored, problems = hub.restore("batch:ml/x", ["GPU-t4-0"])
    assert restored == [] and problems == ["device GPU-t4-0 is already held by batch:ml/x"]


def test_registry_file_format_and_permissions(path):
    hub, batch = hub_and_batch(path)
    hub.allocate("alice/", T4)
    batch.allocate("batch:ml/train-1", T4)
    assert json.loads(path.read_text()) == {
        "version": 1,
        "claims": {
            "GPU-t4-0": {"component": "notebooks", "owner": "alice/"},
            "GPU-t4-1": {"component": "batch", "owner": "batch:ml/train-1"},
        },
    }
    assert path.stat().st_mode & 0o777 == 0o600
    # the lock file beside it, and no temporary file left behind by the atomic writes
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "device-claims.json",
        "device-claims.json.lock",
    ]


def test_claims_survive_a_restart_and_reconcile_drops_only_own_stale_ones(path):
    hub, batch = hub_and_batch(path, n=4)
    hub.allocate("alice/", T4)  # GPU-t4-0: alice's server still runs after the restart
    hub.allocate("bob/", T4)  # GPU-t4-1: bob's server is gone (never restored)
    batch.allocate("batch:ml/train-1", T4)  # GPU-t4-2: the batch service's, not the hub's
    del hub  # the hub process ends; its claims stay in the registry

    restarted = DeviceAllocator(t4s(4), claims_path=path, component="notebooks")
    assert restarted.free_and_total(T4) == (1, 4), "claims outlive the process"
    assert restarted.owner_of("GPU-t4-1") == "bob/"
    restored, problems = restarted.restore("alice/", ["GPU-t4-0"])
    assert [d.uuid for d in restored] == ["GPU-t4-0"] and problems == []
    assert not restarted.reconciled
    assert restarted.reconcile() == [("GPU-t4-1", "bob/")]
    assert restarted.reconciled
    assert restarted.owner_of("GPU-t4-0") == "alice/"
    assert restarted.owner_of("GPU-t4-1") is None
    assert batch.owner_of("GPU-t4-2") == "batch:ml/train-1", "the other side's claim stays"
    assert restarted.reconcile() == [], "reconciling again drops nothing"
    # the batch side reconciling keeps its own live claim and all of the hub's
    assert batch.reconcile() == []
    assert restarted.owner_of("GPU-t4-0") == "alice/"
    assert [d.uuid for d in restarted.allocate("carol/", T4)] == ["GPU-t4-1"]


def test_restore_refuses_a_device_the_other_process_holds(path):
    hub, batch = hub_and_batch(path)
    batch.allocate("batch:ml/train-1", T4)
    restored, problems = hub.restore("alice/", ["GPU-t4-0", "GPU-t4-1"])
    assert [d.uuid for d in restored] == ["GPU-t4-1"]
    assert problems == ["device GPU-t4-0 is already held by batch:ml/train-1"]


def test_missing_registry_means_no_claims(path):
    hub, _ = hub_and_batch(path)
    assert not path.exists()
    assert hub.free_and_total(T4) == (2, 2) and hub.release("alice/") == []
    assert not path.exists(), "nothing changed, nothing written"
    hub.allocate("alice/", T4)
    path.unlink()  # an administrator removed it: everything counts as free again
    assert hub.free_and_total(T4) == (2, 2)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"claims": {}}',
        '{"version": 2, "claims": {}}',
        '{"version": 1, "claims": {"GPU-t4-0": {"owner": "alice/"}}}',
        '{"version": 1, "claims": {"GPU-t4-0": {"component": "notebooks", "owner": ""}}}',
        '{"version": 1, "claims": []}',
        "[]",
    ],
)
def test_corrupt_registry_refuses_everything_with_a_clear_error(path, content):
    hub, _ = hub_and_batch(path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    expected = (
        rf"^accelerators cannot be handed out now: the device claims registry {path} is "
        r"unusable \(it is not a claims registry: .+\); an administrator must repair or remove it$"
    )
    # a NoFreeDevice: the spawner and the batch queue refuse with this sentence
    with pytest.raises(NoFreeDevice, match=expected) as refused:
        hub.allocate("alice/", T4)
    assert isinstance(refused.value, DeviceClaimsError)
    for call in (
        lambda: hub.free_and_total(T4),
        lambda: hub.release("alice/"),
        lambda: hub.restore("alice/", ["GPU-t4-0"]),
        hub.reconcile,
    ):
        with pytest.raises(DeviceClaimsError, match=expected):
            call()
    assert path.read_text() == content, "an unreadable registry is never overwritten"
    assert not hub.reconciled


def test_unwritable_registry_leaves_claims_as_they_were(path, monkeypatch):
    hub, batch = hub_and_batch(path)
    hub.allocate("alice/", T4)

    def fail(self, claims):
        raise self._error("cannot write it: No space left on device")

    monkeypatch.setattr(ClaimsFile, "write", fail)
    with pytest.raises(DeviceClaimsError, match="No space left on device"):
        hub.release("alice/")
    with pytest.raises(DeviceClaimsError):
        batch.allocate("batch:ml/train-1", T4)
    monkeypatch.undo()
    assert batch.held_by("batch:ml/train-1") == [] and batch.free_and_total(T4) == (1, 2)
    # the failed release changed nothing, in the file or in what the hub knows it holds
    assert batch.owner_of("GPU-t4-0") == "alice/"
    assert hub.reconcile() == [], "alice's claim is still the hub's own, not stale"
    assert [d.uuid for d in hub.held_by("alice/")] == ["GPU-t4-0"]


def test_folder_that_cannot_exist_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    allocator = DeviceAllocator(t4s(), claims_path=tmp_path / "file" / "c.json", component="x")
    with pytest.raises(DeviceClaimsError, match="cannot open its lock file"):
        allocator.allocate("alice/", T4)


def test_registry_needs_a_component_and_memory_mode_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="component"):
        DeviceAllocator(t4s(), claims_path=tmp_path / "c.json")
    memory = DeviceAllocator(t4s())
    memory.allocate("alice/", T4)
    assert memory.claims_path is None and memory.reconcile() == []
    assert memory.owner_of("GPU-t4-0") == "alice/" and list(tmp_path.iterdir()) == []


def test_batch_backend_claims_under_its_own_component(path):
    catalogue = load_catalogue(REPO / "config" / "catalogue.yaml")
    config = parse_queue_config({"groups": {"ml": {"cpu": 1, "memory": "1Gi"}}}, catalogue)
    backend = LocalBackend(
        config, "/nonexistent", allocator=DeviceAllocator(t4s()), device_claims_path=str(path)
    )
    assert backend.allocator.claims_path == path and backend.allocator.component == "batch"
    assert [d.uuid for d in backend.allocator.devices] == ["GPU-t4-0", "GPU-t4-1"]
    with pytest.raises(ValueError, match="not both"):
        LocalBackend(config, "/x", allocator=backend.allocator, device_claims_path=str(path))
    plain = LocalBackend(config, "/x", allocator=DeviceAllocator(t4s()))
    assert plain.allocator.claims_path is None


# -- two real processes ----------------------------------------------------------------


def _race(path, component, owner, markers, rounds, start, results):
    """Allocate and release over and over; a marker file per held device catches overlap.

    ``O_EXCL`` creation fails if the other process holds the same device at
    the same moment, whatever the allocators believe: that is the evidence.
    """
    allocator = DeviceAllocator(t4s(3), claims_path=path, component=component)
    got = refused = overlaps = 0
    start.wait()
    for i in range(rounds):
        try:
            devices = allocator.allocate(owner, T4, 1 + i % 2)
        except NoFreeDevice:
            refused += 1
            continue
        got += 1
        held = []
        for device in devices:
            try:
                os.close(os.open(markers / device.uuid, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                held.append(device.uuid)
            except FileExistsError:
                overlaps += 1
        time.sleep(0.002)
        for uuid in held:
            os.unlink(markers / uuid)  # before the release: the device is still claimed here
        allocator.release(owner)
    results.put((component, got, refused, overlaps))


def race(tmp_path, shared: bool, rounds: int = 150) -> dict[str, tuple[int, int, int]]:
    ctx = multiprocessing.get_context("spawn")  # nothing inherited: two independent processes
    markers = tmp_path / "markers"
    markers.mkdir()
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = []
    for component, owner in (("notebooks", "alice/"), ("batch", "batch:ml/job")):
        # without sharing, each process keeps its claims in its own memory (the old setup)
        path = tmp_path / "claims.json" if shared else None
        args = (path, component, owner, markers, rounds, start, results)
        procs.append(ctx.Process(target=_race, args=args))
    for proc in procs:
        proc.start()
    out = {}
    for _ in procs:
        component, got, refused, overlaps = results.get(timeout=120)
        out[component] = (got, refused, overlaps)
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    return out


def test_two_processes_racing_never_hold_the_same_device(tmp_path):
    out = race(tmp_path, shared=True)
    assert [o[2] for o in out.values()] == [0, 0], f"a device was held twice: {out}"
    assert all(o[0] > 0 for o in out.values()), f"both processes got devices: {out}"
    assert sum(o[1] for o in out.values()) > 0, f"they competed (some refusals): {out}"
    assert json.loads((tmp_path / "claims.json").read_text())["claims"] == {}


def test_the_race_detects_overlap_without_a_shared_registry(tmp_path):
    # the control: separate in-memory allocators hand out the same devices, and it shows
    out = race(tmp_path, shared=False, rounds=60)
    assert sum(o[2] for o in out.values()) > 0, out
