"""GPU and MIG discovery against a fake pynvml module (no driver needed)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from labfleet_spawner import nvml as nvml_mod
from labfleet_spawner.nvml import Discovery, GpuDevice, MigDevice, discover, parse_mig_profile

GiB = 2**30


class FakeNvml:
    """The parts of pynvml that discovery uses, over a list of GPU descriptions.

    ``gpus``: dicts with name, uuid, memory and optionally ``mig``: a list of
    ``(uuid, name, memory)`` per slot, ``None`` for an empty slot.
    """

    NVML_DEVICE_MIG_ENABLE = 1
    NVML_DEVICE_MIG_DISABLE = 0

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    class NVMLError_NoPermission(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_NotFound(NVMLError):
        pass

    class NVMLError_GpuIsLost(NVMLError):
        pass

    def __init__(self, gpus=(), init_error=None, as_bytes=False, lost=()):
        self.gpus = list(gpus)
        self.init_error = init_error
        self.as_bytes = as_bytes
        self.lost = set(lost)
        self.initialised = 0
        self.shutdowns = 0

    def _s(self, text):
        return text.encode() if self.as_bytes else text

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error
        self.initialised += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if index in self.lost:
            raise self.NVMLError_GpuIsLost("GPU is lost")
        return ("gpu", index)

    def _entry(self, handle):
        gpu = self.gpus[handle[1]]
        if handle[0] == "gpu":
            return gpu["uuid"], gpu["name"], gpu.get("memory", 16 * GiB)
        return gpu["mig"][handle[2]]

    def nvmlDeviceGetUUID(self, handle):
        return self._s(self._entry(handle)[0])

    def nvmlDeviceGetName(self, handle):
        return self._s(self._entry(handle)[1])

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=self._entry(handle)[2], used=0, free=self._entry(handle)[2])

    def nvmlDeviceGetMigMode(self, handle):
        gpu = self.gpus[handle[1]]
        if "mig" not in gpu:
            raise self.NVMLError_NotSupported("Not Supported")
        return [1 if gpu["mig"] is not False else 0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, slot):
        migs = self.gpus[handle[1]]["mig"] or []
        if slot >= len(migs) or migs[slot] is None:
            raise self.NVMLError_NotFound("Not Found")
        return ("mig", handle[1], slot)


A100_UUID = "GPU-a100a100-0000-0000-0000-000000000002"


def mixed_machine(**kwargs) -> FakeNvml:
    """Two T4s, an RTX 5000 and a MIG-enabled A100 with two 1g.10gb and one 3g.40gb slices."""
    return FakeNvml(
        [
            {"name": "Tesla T4", "uuid": "GPU-t4t4t4t4-0000-0000-0000-000000000000"},
            {"name": "Tesla T4", "uuid": "GPU-t4t4t4t4-0000-0000-0000-000000000001"},
            {
                "name": "NVIDIA A100-SXM4-80GB",
                "uuid": A100_UUID,
                "memory": 80 * GiB,
                "mig": [
                    (
                        "MIG-11111111-0000-0000-0000-000000000000",
                        "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
                        10 * GiB,
                    ),
                    None,
                    (
                        "MIG-11111111-0000-0000-0000-000000000002",
                        "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
                        10 * GiB,
                    ),
                    (
                        "MIG-33333333-0000-0000-0000-000000000003",
                        "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                        40 * GiB,
                    ),
                ],
            },
            {
                "name": "Quadro RTX 5000",
                "uuid": "GPU-rtx5000-0000-0000-0000-000000000003",
                "mig": False,
            },
        ],
        **kwargs,
    )


@pytest.fixture(autouse=True)
def _forget_logged_reasons():
    nvml_mod._logged_reasons.clear()
    yield
    nvml_mod._logged_reasons.clear()


def test_whole_gpus_and_mig_instances():
    fake = mixed_machine()
    found = discover(fake)
    assert found.available and found.reason == ""
    assert [g.name for g in found.devices] == [
        "Tesla T4",
        "Tesla T4",
        "NVIDIA A100-SXM4-80GB",
        "Quadro RTX 5000",
    ]
    t4 = found.devices[0]
    assert t4 == GpuDevice(0, "GPU-t4t4t4t4-0000-0000-0000-000000000000", "Tesla T4", 16 * GiB)
    a100 = found.devices[2]
    assert a100.mig_enabled and a100.memory_total == 80 * GiB
    assert [(m.profile, m.index, m.parent_index, m.parent_uuid) for m in a100.mig_devices] == [
        ("1g.10gb", 0, 2, A100_UUID),
        ("1g.10gb", 2, 2, A100_UUID),
        ("3g.40gb", 3, 2, A100_UUID),
    ]
    assert all(m.uuid.startswith("MIG-") for m in a100.mig_devices)
    assert a100.mig_devices[0].memory_total == 10 * GiB
    # A GPU that supports MIG but has it disabled is a whole GPU.
    assert not found.devices[3].mig_enabled and found.devices[3].mig_devices == ()
    assert fake.initialised == 1 and fake.shutdowns == 1


def test_allocatable_units_replace_a_mig_gpu_by_its_slices():
    units = discover(mixed_machine()).allocatable()
    kinds = [(u.kind, u.name) for u in units]
    assert ("gpu", "NVIDIA A100-SXM4-80GB") not in kinds
    assert sum(1 for u in units if isinstance(u, MigDevice)) == 3
    assert sum(1 for u in units if isinstance(u, GpuDevice)) == 3


def test_old_bindings_returning_bytes_are_decoded():
    found = discover(mixed_machine(as_bytes=True))
    assert found.devices[0].name == "Tesla T4"
    assert found.devices[2].mig_devices[0].profile == "1g.10gb"
    assert isinstance(found.devices[2].mig_devices[0].uuid, str)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (FakeNvml.NVMLError_LibraryNotFound("NVML Shared Library Not Found"), "was not found"),
        (FakeNvml.NVMLError_DriverNotLoaded("Driver Not Loaded"), "driver is not loaded"),
        (FakeNvml.NVMLError_NoPermission("Insufficient Permissions"), "no permission"),
        (FakeNvml.NVMLError("Unknown Error"), "could not be initialised: Unknown Error"),
    ],
)
def test_no_driver_means_no_devices_and_a_reason(error, words, caplog):
    fake = FakeNvml(init_error=error)
    with caplog.at_level(logging.INFO, logger="labfleet_spawner.nvml"):
        found = discover(fake)
        discover(fake)
    assert found == Discovery((), found.reason)
    assert words in found.reason and not found.available
    assert found.allocatable() == []
    lines = [r for r in caplog.records if r.getMessage().startswith("no NVIDIA GPU:")]
    assert len(lines) == 1, "the reason is logged once"
    assert lines[0].levelno == logging.INFO
    assert lines[0].getMessage().endswith("; only CPU profiles can be started")
    assert fake.shutdowns == 0, "nvmlShutdown only after a successful nvmlInit"


def test_real_pynvml_without_a_driver_is_not_an_error():
    pynvml = pytest.importorskip("pynvml")
    found = discover(pynvml)
    # On a machine with a GPU this finds it; without one it explains why not.
    assert found.devices or found.reason


def test_a_lost_gpu_is_skipped_with_a_warning(caplog):
    fake = mixed_machine(lost={1})
    with caplog.at_level(logging.WARNING, logger="labfleet_spawner.nvml"):
        found = discover(fake)
    assert [g.index for g in found.devices] == [0, 2, 3]
    assert any("GPU 1 skipped" in w for w in found.warnings)
    assert "GPU 1 skipped" in caplog.text
    assert fake.shutdowns == 1


def test_shutdown_even_when_listing_fails():
    fake = mixed_machine()

    def broken():
        raise fake.NVMLError("Unknown Error")

    fake.nvmlDeviceGetCount = broken
    found = discover(fake)
    assert found.devices == () and "could not count" in found.reason
    assert fake.shutdowns == 1


def test_mig_mode_without_instances_warns():
    fake = FakeNvml([{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-h100", "mig": []}])
    found = discover(fake)
    assert found.devices[0].mig_enabled and found.allocatable() == []
    assert any("no MIG instances" in w for w in found.warnings)


def test_no_gpus_at_all():
    found = discover(FakeNvml([]))
    assert found.devices == () and found.reason == "NVML reports no usable GPU"


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "1g.5gb"),
        ("NVIDIA A100-PCIE-40GB MIG 3g.20gb", "3g.20gb"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me", "1g.10gb+me"),
        ("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb", "1c.3g.20gb"),
        ("Tesla T4", None),
        ("", None),
    ],
)
def test_parse_mig_profile(name, profile):
    assert parse_mig_profile(name) == profile
