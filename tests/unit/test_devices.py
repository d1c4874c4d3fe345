"""Exclusive, all-or-nothing device allocation (pure bookkeeping)."""

from __future__ import annotations

from pathlib import Path

import pytest
from labfleet_spawner.catalogue import Accelerator, load_catalogue
from labfleet_spawner.devices import (
    DeviceAllocator,
    FpgaDevice,
    NoFreeDevice,
    cuda_visible_devices,
    matches,
)
from labfleet_spawner.nvml import Discovery, GpuDevice, MigDevice

REPO = Path(__file__).resolve().parents[2]

T4 = Accelerator("t4", "gpu", "nvidia.com/gpu", "NVIDIA Tesla T4", nvml_models=("Tesla T4",))
RTX = Accelerator(
    "rtx5000", "gpu", "nvidia.com/gpu", "NVIDIA RTX 5000", nvml_models=("Quadro RTX 5000",)
)
A100 = Accelerator("a100", "gpu", "nvidia.com/gpu", "NVIDIA A100", nvml_models=("a100",))
A30 = Accelerator("a30", "gpu", "nvidia.com/gpu", "NVIDIA A30", nvml_models=("A30",))
MIG = Accelerator(
    "mig-1g.10gb", "mig", "nvidia.com/mig-1g.10gb", "A100 MIG 1g.10gb", mig_profile="1g.10gb"
)
U55C = Accelerator("u55c", "fpga", "amd.com/xilinx_u55c", "AMD Alveo U55C")


def _mig(slot, profile, parent=2, parent_uuid="GPU-a100-mig"):
    return MigDevice(
        uuid=f"MIG-{profile}-{slot}",
        name=f"NVIDIA A100-SXM4-80GB MIG {profile}",
        profile=profile,
        parent_index=parent,
        parent_uuid=parent_uuid,
        index=slot,
    )


def machine() -> Discovery:
    return Discovery(
        (
            GpuDevice(0, "GPU-t4-0", "Tesla T4"),
            GpuDevice(1, "GPU-t4-1", "Tesla T4"),
            GpuDevice(
                2,
                "GPU-a100-mig",
                "NVIDIA A100-SXM4-80GB",
                mig_enabled=True,
                mig_devices=(_mig(0, "1g.10gb"), _mig(1, "1g.10gb"), _mig(2, "3g.40gb")),
            ),
            GpuDevice(3, "GPU-a100-whole", "NVIDIA A100-PCIE-40GB"),
        )
    )


@pytest.fixture
def allocator():
    return DeviceAllocator.from_discovery(machine(), {"u55c": ["/dev/xclmgmt1", "/dev/xclmgmt2"]})


def test_matching_rules(allocator):
    by_uuid = {d.uuid: d for d in allocator.devices}
    assert "GPU-a100-mig" not in by_uuid, "a GPU in MIG mode is handed out only as slices"
    assert [d.uuid for d in allocator.matching(T4)] == ["GPU-t4-0", "GPU-t4-1"]
    # Case-insensitive substring of the NVML name; the MIG-mode A100 does not count.
    assert [d.uuid for d in allocator.matching(A100)] == ["GPU-a100-whole"]
    assert [d.uuid for d in allocator.matching(MIG)] == ["MIG-1g.10gb-0", "MIG-1g.10gb-1"]
    assert [d.uuid for d in allocator.matching(U55C)] == ["/dev/xclmgmt1", "/dev/xclmgmt2"]
    assert allocator.matching(RTX) == [] and allocator.matching(A30) == []
    mig_gpu = GpuDevice(2, "GPU-x", "NVIDIA A100-SXM4-80GB", mig_enabled=True)
    assert not matches(A100, mig_gpu)
    assert not matches(MIG, _mig(0, "1g.5gb"))
    assert not matches(T4, FpgaDevice("/dev/xclmgmt1", "t4"))
    assert not matches(U55C, FpgaDevice("/dev/xclmgmt9", "v70"))
    no_profile = MigDevice("MIG-x", "odd", None, 0, "GPU-y")
    assert not matches(Accelerator("m", "mig", "r/x", mig_profile=None), no_profile)


def test_availability(allocator):
    allocator.allocate("alice/", T4)
    assert allocator.availability([T4, MIG, A30, U55C]) == {
        "t4": (1, 2),
        "mig-1g.10gb": (2, 2),
        "a30": (0, 0),
        "u55c": (2, 2),
    }


def test_exclusive_allocation_and_refusal(allocator):
    alice = allocator.allocate("alice/", T4)
    bob = allocator.allocate("bob/", T4)
    assert {d.uuid for d in alice}.isdisjoint({d.uuid for d in bob})
    assert {d.uuid for d in alice + bob} == {"GPU-t4-0", "GPU-t4-1"}
    with pytest.raises(NoFreeDevice) as refused:
        allocator.allocate("carol/", T4)
    assert str(refused.value) == (
        "no NVIDIA Tesla T4 is free: 2 in total, all in use; try another profile or later"
    )
    assert allocator.held_by("carol/") == []
    allocator.release("alice/")
    assert [d.uuid for d in allocator.allocate("carol/", T4)] == [alice[0].uuid]


def test_missing_model_message(allocator):
    with pytest.raises(NoFreeDevice, match=r"^this machine has no NVIDIA A30; choose another"):
        allocator.allocate("alice/", A30)


def test_more_than_exist_message(allocator):
    with pytest.raises(
        NoFreeDevice, match=r"3 × NVIDIA Tesla T4 requested, but this machine has only 2"
    ):
        allocator.allocate("alice/", T4, 3)


def test_all_or_nothing(allocator):
    allocator.allocate("bob/", T4)
    allocator.allocate("alice/", MIG)  # alice held a MIG slice from an earlier start
    with pytest.raises(NoFreeDevice, match=r"only 1 of 2 are free"):
        allocator.allocate("alice/", T4, 2)
    assert allocator.held_by("alice/") == [], "a failed allocation holds nothing"
    assert allocator.free_and_total(T4) == (1, 2)
    assert allocator.free_and_total(MIG) == (2, 2)


def test_multi_device_allocation_is_ordered(allocator):
    got = allocator.allocate("alice/", T4, 2)
    assert [d.index for d in got] == [0, 1]
    assert cuda_visible_devices(got) == "GPU-t4-0,GPU-t4-1"


def test_new_allocation_supersedes_the_owners_old_one(allocator):
    allocator.allocate("alice/", T4)
    allocator.allocate("alice/", MIG)
    assert [d.kind for d in allocator.held_by("alice/")] == ["mig"]
    assert allocator.free_and_total(T4) == (2, 2)


def test_release(allocator):
    allocator.allocate("alice/", T4)
    allocator.allocate("alice/work", U55C)
    assert allocator.release("alice/") == ["GPU-t4-0"]
    assert allocator.release("alice/") == []
    assert [d.uuid for d in allocator.held_by("alice/work")] == ["/dev/xclmgmt1"]


def test_restore_after_hub_restart(allocator):
    restored, problems = allocator.restore("alice/", ["GPU-t4-1", "MIG-1g.10gb-1"])
    assert [d.uuid for d in restored] == ["GPU-t4-1", "MIG-1g.10gb-1"] and problems == []
    assert allocator.owner_of("GPU-t4-1") == "alice/"
    # Restoring twice is harmless; the restored device is no longer free to others.
    assert allocator.restore("alice/", ["GPU-t4-1"])[0]
    assert [d.uuid for d in allocator.allocate("bob/", T4)] == ["GPU-t4-0"]
    restored, problems = allocator.restore("carol/", ["GPU-t4-0", "GPU-gone"])
    assert restored == []
    assert problems == [
        "device GPU-t4-0 is already held by bob/",
        "device GPU-gone is no longer on this machine",
    ]


def test_invalid_inputs():
    with pytest.raises(ValueError, match="listed twice"):
        DeviceAllocator([GpuDevice(0, "GPU-a", "Tesla T4"), GpuDevice(1, "GPU-a", "Tesla T4")])
    with pytest.raises(ValueError, match="at least 1"):
        DeviceAllocator().allocate("alice/", T4, 0)


def test_empty_machine():
    allocator = DeviceAllocator.from_discovery(Discovery(reason="no driver"))
    assert allocator.devices == []
    assert allocator.availability([T4, MIG]) == {"t4": (0, 0), "mig-1g.10gb": (0, 0)}


def test_repository_catalogue_matches_real_nvml_names():
    catalogue = load_catalogue(REPO / "config" / "catalogue.yaml")
    allocator = DeviceAllocator.from_discovery(machine())
    accelerators = catalogue.accelerators
    assert allocator.free_and_total(accelerators["t4"]) == (2, 2)
    assert allocator.free_and_total(accelerators["mig-1g.10gb"]) == (2, 2)
    assert allocator.free_and_total(accelerators["a100"]) == (1, 1)
    assert allocator.free_and_total(accelerators["u55c"]) == (0, 0)
    with pytest.raises(NoFreeDevice, match=r"^this machine has no NVIDIA Quadro RTX 5000"):
        allocator.allocate("alice/", accelerators["rtx5000"])
