"""Find this machine's NVIDIA GPUs and MIG instances through NVML.

:func:`discover` is the only function that talks to the driver. It takes the
``pynvml`` module as a parameter (imported lazily when not given) so that unit
tests pass a fake, and it always returns a :class:`Discovery` -- never raises
for a machine without GPUs: a laptop or a CPU-only server is a normal place to
run labfleet's single-node mode, where only CPU profiles can start.

NVML sees every GPU on the machine regardless of ``CUDA_VISIBLE_DEVICES``;
the hub process must therefore not be restricted to a subset of GPUs itself.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: The profile is the last word of a MIG device's name, e.g.
#: "NVIDIA A100-SXM4-40GB MIG 1g.5gb" or "NVIDIA H100 80GB HBM3 MIG 1g.10gb+me".
#: A compute-instance share such as "1c.3g.20gb" is kept whole on purpose, so that
#: it never passes for the full 3g.20gb instance.
_MIG_NAME_RE = re.compile(r"\bMIG\s+(\S+)\s*$")

# Reasons already logged: the "no GPU" line is useful once, not on every discovery.
_logged_reasons: set[str] = set()


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance: an allocatable slice of a MIG-enabled GPU."""

    uuid: str  # "MIG-..."; what CUDA_VISIBLE_DEVICES accepts
    name: str  # as NVML reports it, e.g. "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    profile: str | None  # e.g. "1g.5gb"; None when the name could not be parsed
    parent_index: int
    parent_uuid: str
    index: int = 0  # slot on the parent GPU
    memory_total: int = 0  # bytes

    @property
    def kind(self) -> str:
        return "mig"


@dataclass(frozen=True)
class GpuDevice:
    """One physical GPU. In MIG mode only its :attr:`mig_devices` can be handed out."""

    index: int
    uuid: str  # "GPU-..."
    name: str  # e.g. "Tesla T4", "NVIDIA A100-SXM4-40GB"
    memory_total: int = 0  # bytes
    mig_enabled: bool = False
    mig_devices: tuple[MigDevice, ...] = ()

    @property
    def kind(self) -> str:
        return "gpu"


@dataclass(frozen=True)
class Discovery:
    """What NVML found. ``reason`` says why nothing was found (empty when NVML answered)."""

    devices: tuple[GpuDevice, ...] = ()
    reason: str = ""
    warnings: tuple[str, ...] = field(default=())

    @property
    def available(self) -> bool:
        return not self.reason

    def allocatable(self) -> list[GpuDevice | MigDevice]:
        """Whole GPUs not in MIG mode, and the MIG instances of those that are."""
        units: list[GpuDevice | MigDevice] = []
        for gpu in self.devices:
            if gpu.mig_enabled:
                units.extend(gpu.mig_devices)
            else:
                units.append(gpu)
        return units


def parse_mig_profile(name: str) -> str | None:
    """``"1g.5gb"`` from ``"NVIDIA A100-SXM4-40GB MIG 1g.5gb"``; None if there is no profile."""
    match = _MIG_NAME_RE.search(name or "")
    return match.group(1) if match else None


def _text(value) -> str:
    # Old nvidia-ml-py releases return bytes; current ones return str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def describe_init_error(nvml, error: Exception) -> str:
    """A sentence for an admin reading the hub log, from an NVMLError raised by nvmlInit."""
    not_found = getattr(nvml, "NVMLError_LibraryNotFound", None)
    not_loaded = getattr(nvml, "NVMLError_DriverNotLoaded", None)
    no_permission = getattr(nvml, "NVMLError_NoPermission", None)
    if not_found and isinstance(error, not_found):
        return "the NVML library (libnvidia-ml.so.1) was not found; is the NVIDIA driver installed?"
    if not_loaded and isinstance(error, not_loaded):
        return "the NVIDIA kernel driver is not loaded"
    if no_permission and isinstance(error, no_permission):
        return "the hub has no permission to use NVML (/dev/nvidia*)"
    return f"NVML could not be initialised: {error}"


def _read_mig_devices(nvml, handle, parent_index: int, parent_uuid: str, warnings: list):
    devices = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:
            # An empty slot answers NVMLError_NotFound: fewer instances than the maximum.
            continue
        name = _text(nvml.nvmlDeviceGetName(mig))
        profile = parse_mig_profile(name)
        if profile is None:
            warnings.append(f"GPU {parent_index}: MIG device {name!r} has no profile in its name")
        try:
            memory = int(nvml.nvmlDeviceGetMemoryInfo(mig).total)
        except nvml.NVMLError:
            memory = 0
        devices.append(
            MigDevice(
                uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                name=name,
                profile=profile,
                parent_index=parent_index,
                parent_uuid=parent_uuid,
                index=slot,
                memory_total=memory,
            )
        )
    return tuple(devices)


def _mig_enabled(nvml, handle) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:
        # NVMLError_NotSupported: a GPU without MIG (T4, RTX, ...).
        return False
    return current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)


def _read_gpu(nvml, index: int, warnings: list) -> GpuDevice:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    name = _text(nvml.nvmlDeviceGetName(handle))
    try:
        memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except nvml.NVMLError:
        memory = 0
    mig_enabled = _mig_enabled(nvml, handle)
    migs = _read_mig_devices(nvml, handle, index, uuid, warnings) if mig_enabled else ()
    if mig_enabled and not migs:
        warnings.append(f"GPU {index} ({name}) is in MIG mode but has no MIG instances")
    return GpuDevice(index, uuid, name, memory, mig_enabled, migs)


def _report(discovery: Discovery, logger) -> Discovery:
    if discovery.reason and discovery.reason not in _logged_reasons:
        _logged_reasons.add(discovery.reason)
        logger.info("no NVIDIA GPU: %s; only CPU profiles can be started", discovery.reason)
    for warning in discovery.warnings:
        logger.warning("NVML: %s", warning)
    return discovery


def discover(nvml=None, logger: logging.Logger | None = None) -> Discovery:
    """List the GPUs and MIG instances NVML reports. Never raises for a machine without GPUs.

    ``nvml`` is the ``pynvml`` module (or a fake with the same functions);
    ``logger`` receives the one-time "no NVIDIA GPU" line and per-device warnings.
    """
    logger = logger or log
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as e:
            return _report(Discovery(reason=f"nvidia-ml-py is not installed ({e})"), logger)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return _report(Discovery(reason=describe_init_error(nvml, e)), logger)
    warnings: list[str] = []
    try:
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as e:
            return _report(Discovery(reason=f"NVML could not count the GPUs: {e}"), logger)
        devices = []
        for index in range(count):
            try:
                devices.append(_read_gpu(nvml, index, warnings))
            except nvml.NVMLError as e:
                # One broken GPU (e.g. "GPU is lost") must not hide the healthy ones.
                warnings.append(f"GPU {index} skipped: {e}")
        reason = "" if devices else "NVML reports no usable GPU"
        return _report(Discovery(tuple(devices), reason, tuple(warnings)), logger)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as e:
            logger.debug("nvmlShutdown failed: %s", e)
