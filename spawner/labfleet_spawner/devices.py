"""Exclusive hand-out of this machine's accelerators to notebook servers.

Pure bookkeeping, no I/O: :class:`DeviceAllocator` is built from what
:mod:`labfleet_spawner.nvml` discovered (plus FPGA boards named in the
configuration, which NVML does not see) and answers three questions for the
local spawner: which devices fit a catalogue accelerator, how many of them are
free, and which ones a server gets. An allocation is all-or-nothing: when a
request cannot be met in full, the owner holds nothing afterwards.

Owners are opaque strings; the local spawner uses ``"<user>/<server name>"``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .catalogue import Accelerator
from .nvml import Discovery, GpuDevice, MigDevice


@dataclass(frozen=True)
class FpgaDevice:
    """An FPGA board known from configuration only: its device path is its identity."""

    uuid: str  # the device path, e.g. "/dev/xclmgmt1234"; unique like a GPU UUID
    accelerator: str  # the catalogue accelerator it belongs to, e.g. "u55c"

    @property
    def kind(self) -> str:
        return "fpga"

    @property
    def name(self) -> str:
        return self.accelerator


Device = GpuDevice | MigDevice | FpgaDevice


class NoFreeDevice(Exception):
    """No (or not enough) devices for a request; the message is meant for the user."""


def fpga_devices_from_config(config: Mapping[str, Iterable[str]]) -> list[FpgaDevice]:
    """``{"u55c": ["/dev/xclmgmt1"]}`` -> FPGA devices for the allocator."""
    return [FpgaDevice(str(path), name) for name, paths in config.items() for path in paths]


def matches(accelerator: Accelerator, device: Device) -> bool:
    """True when ``device`` can serve one unit of the catalogue ``accelerator``.

    - ``gpu``: a whole GPU *not* in MIG mode (a GPU in MIG mode is spoken for by
      its slices) whose NVML name contains one of ``nvml_models``, ignoring case;
    - ``mig``: a MIG instance whose profile equals ``mig_profile`` exactly;
    - ``fpga``: a board configured for this accelerator by name.
    """
    if accelerator.kind == "gpu":
        if not isinstance(device, GpuDevice) or device.mig_enabled:
            return False
        name = device.name.casefold()
        return any(model.casefold() in name for model in accelerator.nvml_models if model)
    if accelerator.kind == "mig":
        return (
            isinstance(device, MigDevice)
            and device.profile is not None
            and device.profile == accelerator.mig_profile
        )
    if accelerator.kind == "fpga":
        return isinstance(device, FpgaDevice) and device.accelerator == accelerator.name
    return False


def _label(accelerator: Accelerator) -> str:
    return accelerator.display_name or accelerator.name


class DeviceAllocator:
    """Which server holds which device; one instance per hub process.

    ``devices`` are the allocatable units: whole GPUs, MIG instances and FPGA
    boards (see :meth:`from_discovery`). A GPU in MIG mode passed here is
    replaced by its MIG instances.
    """

    def __init__(self, devices: Iterable[Device] = ()):
        units: dict[str, Device] = {}
        for device in devices:
            parts = device.mig_devices if getattr(device, "mig_enabled", False) else (device,)
            for unit in parts:
                if unit.uuid in units:
                    raise ValueError(f"device {unit.uuid} is listed twice")
                units[unit.uuid] = unit
        self._devices = units
        self._owner_of: dict[str, str] = {}
        # The hub is single-threaded, but tools and tests may call from threads.
        self._lock = threading.Lock()

    @classmethod
    def from_discovery(
        cls, discovery: Discovery, fpga_devices: Mapping[str, Iterable[str]] | None = None
    ) -> DeviceAllocator:
        return cls([*discovery.allocatable(), *fpga_devices_from_config(fpga_devices or {})])

    # -- queries --------------------------------------------------------------

    @property
    def devices(self) -> list[Device]:
        return list(self._devices.values())

    def device(self, uuid: str) -> Device | None:
        return self._devices.get(uuid)

    def matching(self, accelerator: Accelerator) -> list[Device]:
        return [d for d in self._devices.values() if matches(accelerator, d)]

    def held_by(self, owner: str) -> list[Device]:
        return [self._devices[u] for u, o in self._owner_of.items() if o == owner]

    def owner_of(self, uuid: str) -> str | None:
        return self._owner_of.get(uuid)

    def free_and_total(self, accelerator: Accelerator) -> tuple[int, int]:
        candidates = self.matching(accelerator)
        free = sum(1 for d in candidates if d.uuid not in self._owner_of)
        return free, len(candidates)

    def availability(self, accelerators: Iterable[Accelerator]) -> dict[str, tuple[int, int]]:
        """``{accelerator name: (free, total)}``, e.g. for the spawn form."""
        return {a.name: self.free_and_total(a) for a in accelerators}

    # -- changes ----------------------------------------------------------------

    def allocate(self, owner: str, accelerator: Accelerator, count: int = 1) -> list[Device]:
        """Give ``count`` free devices matching ``accelerator`` to ``owner``, exclusively.

        Whatever ``owner`` held before is released first: a server runs once,
        and a new start supersedes a stale allocation. On failure the owner
        holds nothing and :class:`NoFreeDevice` says why, in words for the user.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        with self._lock:
            self._release(owner)
            candidates = self.matching(accelerator)
            free = [d for d in candidates if d.uuid not in self._owner_of]
            if len(free) < count:
                raise NoFreeDevice(self._refusal(accelerator, count, len(free), len(candidates)))
            # Stable order (GPU index, then MIG slot) so that logs are easy to follow.
            chosen = sorted(free, key=_sort_key)[:count]
            for device in chosen:
                self._owner_of[device.uuid] = owner
            return chosen

    def release(self, owner: str) -> list[str]:
        """Free everything ``owner`` holds; returns the released UUIDs (empty if none)."""
        with self._lock:
            return self._release(owner)

    def restore(self, owner: str, uuids: Iterable[str]) -> tuple[list[Device], list[str]]:
        """Re-assign devices recorded in a spawner's state after a hub restart.

        Returns ``(restored, problems)``: a UUID this machine no longer has, or
        one another owner holds, is not restored and is described in
        ``problems`` for the log.
        """
        restored, problems = [], []
        with self._lock:
            for uuid in uuids:
                device = self._devices.get(uuid)
                holder = self._owner_of.get(uuid)
                if device is None:
                    problems.append(f"device {uuid} is no longer on this machine")
                elif holder not in (None, owner):
                    problems.append(f"device {uuid} is already held by {holder}")
                else:
                    self._owner_of[uuid] = owner
                    restored.append(device)
        return restored, problems

    def _release(self, owner: str) -> list[str]:
        released = [u for u, o in self._owner_of.items() if o == owner]
        for uuid in released:
            del self._owner_of[uuid]
        return released

    @staticmethod
    def _refusal(accelerator: Accelerator, count: int, free: int, total: int) -> str:
        label = _label(accelerator)
        if total == 0:
            return f"this machine has no {label}; choose another profile"
        if count > total:
            return (
                f"{count} × {label} requested, but this machine has only {total}; "
                "ask for fewer or choose another profile"
            )
        if free == 0:
            return f"no {label} is free: {total} in total, all in use; try another profile or later"
        return (
            f"{count} × {label} requested, but only {free} of {total} are free; "
            "ask for fewer, try another profile or try later"
        )


def _sort_key(device: Device):
    if isinstance(device, GpuDevice):
        return (0, device.index, 0, device.uuid)
    if isinstance(device, MigDevice):
        return (0, device.parent_index, device.index + 1, device.uuid)
    return (1, 0, 0, device.uuid)


def cuda_visible_devices(devices: Iterable[Device]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value for allocated devices: GPU and MIG UUIDs only."""
    return ",".join(d.uuid for d in devices if isinstance(d, GpuDevice | MigDevice))
