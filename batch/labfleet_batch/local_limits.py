"""The single node's live group limits: what a group admin changed through the quota API.

On Kubernetes a group's quota is its Kueue ClusterQueue; on a single node it is
what the local backend lets the group's *running* jobs hold at once (CPU,
memory, each accelerator, running jobs: ``batch.queues.groups`` in the
platform YAML). Both are shown and changed as the same flat entries
``{"flavor", "resource", "nominalQuota"}`` with the same names -- the
flavor of an accelerator is the batch layout's (``labfleet-a100``), its
resource the catalogue's (``nvidia.com/gpu``); CPU and memory are on the
default flavor (``labfleet-default``) -- so the platform admin's caps read the
same in both modes. A single node adds ``jobs`` on the default flavor
(``max_running``; 0: no limit besides the others) and has no borrowing.

The YAML gives the initial values and decides which entries exist; the
values set through the API (those that differ from the YAML's) are kept in
``<state_dir>/group-limits.json``
(the batch service's private state: mode 0600 in its 0700 folder, replaced
atomically) and win over the YAML's at every start. :func:`differences`
tells ``labfleet check-config`` where they differ.

Pure apart from :class:`LimitsStore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from labfleet_accounting.quotas import Change, QuotaError, quantity
from labfleet_spawner.catalogue import Catalogue

from .queues import GroupQuota, QueueConfig

LIMITS_FILE = "group-limits.json"
JOBS = "jobs"
FIELDS = ("cpu", "memory", "accelerators", "max_running")


class LimitsStoreError(RuntimeError):
    """The live limits file cannot be read or written; the message names it."""


def _number_text(value: float | int | str) -> str:
    d = Decimal(str(value))
    return str(int(d)) if d == d.to_integral_value() else str(d.normalize())


def _memory_text(size: Decimal) -> str:
    """Bytes as the YAML writes memory: ``16Gi``, ``512Mi``, else bytes."""
    for suffix, unit in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size and size % unit == 0:
            return f"{int(size // unit)}{suffix}"
    return _number_text(size)


def limit_entries(config: QueueConfig, catalogue: Catalogue, quota: GroupQuota) -> list[dict]:
    """The group's limits as flat quota entries (see the module docstring)."""
    default = config.default_flavor()
    entries = [
        {"flavor": default, "resource": "cpu", "nominalQuota": _number_text(quota.cpu)},
        {"flavor": default, "resource": "memory", "nominalQuota": str(quota.memory)},
        {"flavor": default, "resource": JOBS, "nominalQuota": str(quota.max_running)},
    ]
    for name in sorted(quota.accelerators):
        acc = catalogue.accelerators.get(name)
        entries.append({
            "flavor": config.flavor(name),
            "resource": acc.resource if acc else name,
            "nominalQuota": str(quota.accelerators[name]),
            "accelerator": name,
        })  # fmt: skip
    return entries


def usage_entries(config: QueueConfig, catalogue: Catalogue, quota: GroupQuota,
                  used: Mapping[str, float]) -> list[dict]:  # fmt: skip
    """What the group's running jobs hold, per entry, and whether that is above its limit.

    ``used``: :meth:`LocalBackend.usage` (``cpu``, ``memory`` in bytes, ``acc:<name>``,
    ``jobs``)."""
    keys = {"cpu": "cpu", "memory": "memory", JOBS: "jobs"}
    out = []
    for entry in limit_entries(config, catalogue, quota):
        key = f"acc:{entry['accelerator']}" if "accelerator" in entry else keys[entry["resource"]]
        held = Decimal(str(used.get(key, 0)))
        limit = quantity(entry["nominalQuota"])
        unlimited = entry["resource"] == JOBS and limit == 0
        shown = _memory_text(held) if entry["resource"] == "memory" else _number_text(held)
        out.append({
            "flavor": entry["flavor"], "resource": entry["resource"],
            "used": shown, "over": bool(not unlimited and held > limit),
        })  # fmt: skip
    return out


def check_changes(entries: list[dict], changes: Iterable[Change]) -> list[dict]:
    """The entries with ``changes`` made; :class:`QuotaError` naming the field otherwise."""
    index = {(e["flavor"], e["resource"]): i for i, e in enumerate(entries)}
    after = [dict(e) for e in entries]
    for i, ch in enumerate(changes):
        at = index.get((ch.flavor, ch.resource))
        if at is None:
            known = ", ".join(f"{f}/{r}" for f, r in index)
            raise QuotaError(
                f"quotas[{i}].flavor: this group has no limit on {ch.resource} on flavor "
                f"{ch.flavor!r} (an accelerator it is not given); it has: {known}"
            )
        if ch.borrowing is not None:
            raise QuotaError(f"quotas[{i}].borrowingLimit: a single node has no borrowing")
        if ch.nominal is None:
            continue
        value = quantity(ch.nominal)
        whole = ch.resource == JOBS or "accelerator" in entries[at]
        if whole and value != value.to_integral_value():
            raise QuotaError(
                f"quotas[{i}].nominalQuota: {ch.nominal} is not a whole number of {ch.resource}"
            )
        if ch.resource == "memory":
            try:
                from labfleet_spawner.catalogue import parse_quantity

                parse_quantity(ch.nominal)
            except ValueError as e:
                raise QuotaError(f"quotas[{i}].nominalQuota: {e}") from None
        after[at]["nominalQuota"] = (
            _number_text(value) if whole or ch.resource == "cpu" else (ch.nominal)
        )
    return after


def quota_from_entries(quota: GroupQuota, entries: Iterable[Mapping]) -> GroupQuota:
    """``quota`` with the values of ``entries`` (from :func:`check_changes`)."""
    values: dict[str, Any] = {"accelerators": dict(quota.accelerators)}
    for e in entries:
        if "accelerator" in e:
            values["accelerators"][e["accelerator"]] = int(quantity(e["nominalQuota"]))
        elif e["resource"] == "cpu":
            cpu = quantity(e["nominalQuota"])
            values["cpu"] = int(cpu) if cpu == cpu.to_integral_value() else float(cpu)
        elif e["resource"] == "memory":
            values["memory"] = str(e["nominalQuota"])
        elif e["resource"] == JOBS:
            values["max_running"] = int(quantity(e["nominalQuota"]))
    return dataclasses.replace(quota, **values)


def quota_data(quota: GroupQuota) -> dict:
    """The live values of a group as plain data (the YAML's field names)."""
    return {
        "cpu": quota.cpu,
        "memory": quota.memory,
        "accelerators": dict(quota.accelerators),
        "max_running": quota.max_running,
    }


def live_values(configured: GroupQuota, current: GroupQuota) -> dict:
    """What the file keeps for a group: only the values that differ from the YAML's, so a
    value never set (or set back) through the API follows the YAML when it is edited."""
    before, after = quota_data(configured), quota_data(current)
    out: dict[str, Any] = {k: after[k] for k in ("cpu", "memory", "max_running")
                           if str(after[k]) != str(before[k])}  # fmt: skip
    accelerators = {a: n for a, n in after["accelerators"].items()
                    if before["accelerators"].get(a) != n}  # fmt: skip
    if accelerators:
        out["accelerators"] = accelerators
    return out


def live_file(configured: QueueConfig, current: QueueConfig) -> dict[str, dict]:
    """Every group's :func:`live_values`, groups without any left out."""
    out = {}
    for name, quota in current.groups.items():
        if name in configured.groups and (values := live_values(configured.groups[name], quota)):
            out[name] = values
    return out


def overlay(config: QueueConfig, live: Mapping[str, Mapping]) -> QueueConfig:
    """``config`` (the YAML's) with the live values of the groups and entries it has.

    A group or accelerator the YAML no longer has is not brought back."""
    groups = dict(config.groups)
    for name, data in live.items():
        quota = groups.get(name)
        if quota is None or not isinstance(data, Mapping):
            continue
        values: dict[str, Any] = {}
        for key in ("cpu", "memory", "max_running"):
            if key in data:
                values[key] = data[key]
        accelerators = dict(quota.accelerators)
        for acc, count in (data.get("accelerators") or {}).items():
            if acc in accelerators:
                accelerators[acc] = count
        groups[name] = dataclasses.replace(quota, accelerators=accelerators, **values)
    return dataclasses.replace(config, groups=groups)


def differences(config: QueueConfig, live: Mapping[str, Mapping],
                where: str = "batch.queues.groups") -> list[str]:  # fmt: skip
    """One line per value set through the quota API that differs from the YAML's."""
    current = overlay(config, live)
    lines = []
    for name in sorted(config.groups):
        before, after = quota_data(config.groups[name]), quota_data(current.groups[name])
        for key in ("cpu", "memory", "max_running"):
            if str(before[key]) != str(after[key]):
                lines.append(f"{where}.{name}.{key}: {before[key]} in the YAML, {after[key]} live")
        for acc in sorted(before["accelerators"]):
            a, b = before["accelerators"][acc], after["accelerators"][acc]
            if a != b:
                lines.append(f"{where}.{name}.accelerators.{acc}: {a} in the YAML, {b} live")
    return lines


class LimitsStore:
    """``<state_dir>/group-limits.json``: ``{"version": 1, "groups": {group: values}}``."""

    def __init__(self, state_dir: str | os.PathLike):
        self.folder = Path(state_dir)
        self.path = self.folder / LIMITS_FILE

    def load(self) -> dict[str, dict]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise LimitsStoreError(f"cannot read the live group limits {self.path}: {e}") from e
        with os.fdopen(fd) as f:
            try:
                data = json.load(f)
            except ValueError as e:
                raise LimitsStoreError(f"{self.path} is not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("version") != 1:
            raise LimitsStoreError(f"{self.path}: not a version 1 limits file")
        groups = data.get("groups")
        if not isinstance(groups, dict):
            raise LimitsStoreError(f"{self.path}: groups must be a mapping")
        return groups

    def save(self, groups: Mapping[str, Mapping]) -> None:
        """Replace the file atomically (mode 0600, folder 0700, fsync'd)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.folder / f".{LIMITS_FILE}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "groups": dict(groups)}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
