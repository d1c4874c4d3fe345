"""Exclusive hand-out of this machine's accelerators to notebook servers and batch jobs.

:class:`DeviceAllocator` is built from what :mod:`labfleet_spawner.nvml`
discovered (plus FPGA boards named in the configuration, which NVML does not
see) and answers three questions for the local spawner and the local batch
backend: which devices fit a catalogue accelerator, how many of them are free,
and which ones an owner gets. An allocation is all-or-nothing: when a request
cannot be met in full, the owner holds nothing afterwards.

Owners are opaque strings; the local spawner uses ``"<user>/<server name>"``,
the local batch backend ``"batch:<group>/<job name>"``.

Without ``claims_path`` the claims live in this process's memory: pure
bookkeeping, no I/O. In single-node mode the hub and the batch service are two
processes handing out the same devices, so both give the same ``claims_path``:
a small JSON registry that every allocation, release and restore reads and
rewrites under an exclusive lock (:class:`ClaimsFile`), so a device is never
handed out twice, whichever process asks. Each claim records the *component*
that made it (``"notebooks"``, ``"batch"``): a component releases, restores
and reconciles only its own claims, whatever its owner strings look like.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


class DeviceClaimsError(NoFreeDevice):
    """The shared claims registry cannot be read or written.

    A :class:`NoFreeDevice`, so that every hand-out path refuses with its
    message (nothing is handed out while nobody can tell what is free); the
    message names the file, for the administrator the user will tell.
    """


class Claim(NamedTuple):
    component: str  # who made the claim: "notebooks" (the hub), "batch"
    owner: str


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


#: The registry format; a file with another version is refused, not guessed at.
CLAIMS_VERSION = 1


class ClaimsFile:
    """The shared registry: ``{"version": 1, "claims": {uuid: {"component", "owner"}}}``.

    A missing file has no claims (first start, or removed by an administrator).
    Anything else unreadable raises :class:`DeviceClaimsError`: treating it as
    empty could hand a device out twice. Changes happen under an exclusive
    ``flock`` on ``<path>.lock`` (a file of its own, because the registry is
    replaced on every write, and a lock on a replaced file would lock nothing)
    and replace the registry atomically, so plain reads need no lock. The
    kernel drops the lock of a process that dies, so a crash cannot wedge it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def read(self) -> dict[str, Claim]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise self._error(f"cannot read it: {e.strerror or e}") from e
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != CLAIMS_VERSION:
                raise ValueError(f"expected an object with version {CLAIMS_VERSION}")
            claims = {}
            for uuid, entry in data["claims"].items():
                claim = Claim(entry["component"], entry["owner"])
                if not all(isinstance(v, str) and v for v in claim):
                    raise ValueError(f"the claim on {uuid} has no component or owner")
                claims[uuid] = claim
            return claims
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise self._error(f"it is not a claims registry: {e}") from e

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise self._error(f"cannot open its lock file: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def write(self, claims: Mapping[str, Claim]) -> None:
        data = {
            "version": CLAIMS_VERSION,
            "claims": {u: {"component": c.component, "owner": c.owner} for u, c in claims.items()},
        }
        tmp = None
        try:
            # mkstemp: mode 0600, in the same folder so that os.replace is atomic
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise self._error(f"cannot write it: {e.strerror or e}") from e

    def _error(self, why: str) -> DeviceClaimsError:
        return DeviceClaimsError(
            f"accelerators cannot be handed out now: the device claims registry {self.path} "
            f"is unusable ({why}); an administrator must repair or remove it"
        )


class DeviceAllocator:
    """Which owner holds which device: one instance per process.

    ``devices`` are the allocatable units: whole GPUs, MIG instances and FPGA
    boards (see :meth:`from_discovery`). A GPU in MIG mode passed here is
    replaced by its MIG instances.

    ``claims_path``: share the claims with the other processes that give the
    same path (see the module docstring); ``component`` names this process's
    side in it and is required with a path. Every method that looks at claims
    may then raise :class:`DeviceClaimsError`.
    """

    def __init__(
        self,
        devices: Iterable[Device] = (),
        *,
        claims_path: str | os.PathLike | None = None,
        component: str = "",
    ):
        units: dict[str, Device] = {}
        for device in devices:
            parts = device.mig_devices if getattr(device, "mig_enabled", False) else (device,)
            for unit in parts:
                if unit.uuid in units:
                    raise ValueError(f"device {unit.uuid} is listed twice")
                units[unit.uuid] = unit
        if claims_path and not component:
            raise ValueError("a shared claims registry needs the component name of this side")
        self._devices = units
        self.component = component
        self._registry = ClaimsFile(claims_path) if claims_path else None
        # uuid -> owner: what this process claimed (or restored) and still holds.
        # Without a registry it is the whole truth; with one, it is how this
        # component tells its live claims from those a previous process left.
        self._mine: dict[str, str] = {}
        #: Whether :meth:`reconcile` has run (callers do it once per process).
        self.reconciled = False
        # The hub is single-threaded, but tools and tests may call from threads.
        self._lock = threading.Lock()

    @classmethod
    def from_discovery(
        cls,
        discovery: Discovery,
        fpga_devices: Mapping[str, Iterable[str]] | None = None,
        *,
        claims_path: str | os.PathLike | None = None,
        component: str = "",
    ) -> DeviceAllocator:
        return cls(
            [*discovery.allocatable(), *fpga_devices_from_config(fpga_devices or {})],
            claims_path=claims_path,
            component=component,
        )

    # -- queries --------------------------------------------------------------

    @property
    def devices(self) -> list[Device]:
        return list(self._devices.values())

    @property
    def claims_path(self) -> Path | None:
        """The shared registry, or None when the claims live in this process only."""
        return self._registry.path if self._registry else None

    def device(self, uuid: str) -> Device | None:
        return self._devices.get(uuid)

    def known_devices(self, uuids: Iterable[str]) -> list[Device]:
        """The devices of this machine among ``uuids``, in order; claims are not consulted."""
        return [self._devices[u] for u in uuids if u in self._devices]

    def matching(self, accelerator: Accelerator) -> list[Device]:
        return [d for d in self._devices.values() if matches(accelerator, d)]

    def held_by(self, owner: str) -> list[Device]:
        """What ``owner`` of this component holds."""
        mine = Claim(self.component, owner)
        return [
            self._devices[u] for u, c in self._view().items() if c == mine and u in self._devices
        ]

    def owner_of(self, uuid: str) -> str | None:
        """Who holds ``uuid``, whichever component claimed it."""
        claim = self._view().get(uuid)
        return claim.owner if claim else None

    def free_and_total(self, accelerator: Accelerator) -> tuple[int, int]:
        return self._free_and_total(accelerator, self._view())

    def availability(self, accelerators: Iterable[Accelerator]) -> dict[str, tuple[int, int]]:
        """``{accelerator name: (free, total)}``, e.g. for the spawn form."""
        claims = self._view()
        return {a.name: self._free_and_total(a, claims) for a in accelerators}

    def _free_and_total(self, accelerator: Accelerator, claims: Mapping[str, Claim]):
        candidates = self.matching(accelerator)
        return sum(1 for d in candidates if d.uuid not in claims), len(candidates)

    # -- changes ----------------------------------------------------------------

    def allocate(self, owner: str, accelerator: Accelerator, count: int = 1) -> list[Device]:
        """Give ``count`` free devices matching ``accelerator`` to ``owner``, exclusively.

        Whatever ``owner`` held before is released first: a server runs once,
        and a new start supersedes a stale allocation. On failure the owner
        holds nothing and :class:`NoFreeDevice` says why, in words for the user.
        Devices claimed by another component (through the registry) are taken.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        candidates = self.matching(accelerator)
        with self._update() as claims:
            self._drop(claims, owner)
            free = [d for d in candidates if d.uuid not in claims]
            # Stable order (GPU index, then MIG slot) so that logs are easy to follow.
            chosen = sorted(free, key=_sort_key)[:count] if len(free) >= count else []
            self._claim(claims, owner, chosen)
        # Raised after the update so that the release above is kept (written) too.
        if not chosen:
            raise NoFreeDevice(self._refusal(accelerator, count, len(free), len(candidates)))
        return chosen

    def release(self, owner: str) -> list[str]:
        """Free everything ``owner`` holds; returns the released UUIDs (empty if none)."""
        with self._update() as claims:
            return self._drop(claims, owner)

    def restore(self, owner: str, uuids: Iterable[str]) -> tuple[list[Device], list[str]]:
        """Re-assign devices recorded in a spawner's (or job's) state after a restart.

        Returns ``(restored, problems)``: a UUID this machine no longer has, or
        one another owner (of any component) holds, is not restored and is
        described in ``problems`` for the log.
        """
        restored, problems = [], []
        mine = Claim(self.component, owner)
        with self._update() as claims:
            for uuid in uuids:
                device = self._devices.get(uuid)
                holder = claims.get(uuid)
                if device is None:
                    problems.append(f"device {uuid} is no longer on this machine")
                elif holder not in (None, mine):
                    problems.append(f"device {uuid} is already held by {holder.owner}")
                else:
                    restored.append(device)
            self._claim(claims, owner, restored)
        return restored, problems

    def reconcile(self) -> list[tuple[str, str]]:
        """Drop this component's claims that this process does not hold; ``[(uuid, owner)]``.

        For a process that restarted, once it has restored what still runs:
        a claim of its component that it did not restore was left by an
        earlier process for an owner that is gone, and would otherwise block
        the device for good. Other components' claims are never touched.
        Without a registry there is nothing to drop.
        """
        with self._update() as claims:
            stale = [
                (uuid, claim.owner)
                for uuid, claim in claims.items()
                if claim.component == self.component and self._mine.get(uuid) != claim.owner
            ]
            for uuid, _ in stale:
                del claims[uuid]
        self.reconciled = True
        return stale

    # -- claims -------------------------------------------------------------------

    def _own_claims(self) -> dict[str, Claim]:
        return {uuid: Claim(self.component, owner) for uuid, owner in self._mine.items()}

    def _view(self) -> dict[str, Claim]:
        """Every claim now: the registry's, or without one this process's."""
        if self._registry is not None:
            return self._registry.read()
        with self._lock:
            return self._own_claims()

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict[str, Claim]]:
        """All claims, to change in place: a read-modify-write of the registry under its lock.

        Changes to this process's own claims go through :meth:`_drop` and
        :meth:`_claim`, which keep ``_mine`` in step; without a registry
        ``_mine`` is all there is and the dict is only a working copy.
        """
        with self._lock:
            if self._registry is None:
                yield self._own_claims()
                return
            with self._registry.locked():
                claims = self._registry.read()
                before, mine = dict(claims), dict(self._mine)
                try:
                    yield claims
                    if claims != before:
                        self._registry.write(claims)
                except BaseException:
                    self._mine = mine  # the registry did not change: neither did our part
                    raise

    def _drop(self, claims: dict[str, Claim], owner: str) -> list[str]:
        mine = Claim(self.component, owner)
        dropped = [uuid for uuid, claim in claims.items() if claim == mine]
        for uuid in dropped:
            del claims[uuid]
        self._mine = {uuid: o for uuid, o in self._mine.items() if o != owner}
        return dropped

    def _claim(self, claims: dict[str, Claim], owner: str, devices: Iterable[Device]) -> None:
        for device in devices:
            claims[device.uuid] = Claim(self.component, owner)
            self._mine[device.uuid] = owner

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
