"""What both backends return: one job as plain data, and the backend interface."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from .validation import BatchRequest

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})


def job_id(group: str, name: str) -> str:
    return f"{group}/{name}"


def split_job_id(value: str) -> tuple[str, str]:
    group, sep, name = value.partition("/")
    if not sep or not group or not name or "/" in name:
        raise ValueError(f"job id {value[:80]!r} is not of the form <group>/<name>")
    return group, name


def snakemake_status(state: str) -> str:
    """Snakemake's cluster-status words: running, success, failed."""
    if state == SUCCEEDED:
        return "success"
    if state in (FAILED, CANCELLED):
        return "failed"
    return "running"


@dataclass
class JobRecord:
    name: str
    group: str
    user: str
    state: str
    display_name: str = ""
    created: str | None = None
    profile: str | None = None
    accelerator: str | None = None
    count: int = 0
    priority: str | None = None
    completions: int = 1
    parallelism: int = 1
    succeeded: int = 0
    failed: int = 0
    active: int = 0
    offload: bool = False
    workdir: str | None = None
    message: str = ""
    queue: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return job_id(self.group, self.name)

    def to_json(self) -> dict[str, Any]:
        # shallow, not dataclasses.asdict: asdict deep-copies field by field,
        # which showed up in the submit profile; only ``queue`` is mutable
        data = {f.name: getattr(self, f.name) for f in _FIELDS}
        data["queue"] = dict(self.queue)
        data["id"] = self.id
        data["snakemake_status"] = snakemake_status(self.state)
        return data


_FIELDS = fields(JobRecord)


class LogsUnavailable(Exception):
    """Logs cannot be read (yet, or on this backend); the message says why."""


def completion_index(raw: str, completions: int) -> int:
    """The ``index`` of a logs request; ValueError naming what is allowed otherwise."""
    try:
        index = int(raw)
    except ValueError:
        raise ValueError("index must be a whole number") from None
    if not 0 <= index < completions:
        raise ValueError(f"index {index} is out of range; allowed: 0 to {completions - 1}")
    return index


class Backend(Protocol):
    """What the service needs from a backend; the Kubernetes and local ones implement it."""

    async def submit(self, request: BatchRequest, user: str) -> JobRecord: ...

    async def list_jobs(self, groups: list[str], owner: str | None = None) -> list[JobRecord]: ...

    async def get(self, group: str, name: str) -> JobRecord | None: ...

    async def logs(self, group: str, name: str, index: int) -> str: ...

    async def cancel(self, group: str, name: str) -> JobRecord: ...
