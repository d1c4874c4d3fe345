"""The local backend's in-memory job: record, request, devices, processes, accounting."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from labfleet_spawner.storage import StorageLayout

from .model import JobRecord
from .validation import BatchRequest


@dataclass
class LocalJob:
    """One job of the local backend: its record and what running and restarting it need."""

    record: JobRecord
    request: BatchRequest | None  # None: restored after it had started (or without a request)
    layout: StorageLayout | None = None  # None: restored while waiting; looked up when it starts
    isolate: bool = False
    submitted: float = 0.0
    devices: list = field(default_factory=list)
    procs: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    task: asyncio.Task | None = None
    cancelled: bool = False
    # being stopped (cancel, time limit, failure): no further completion may start
    stopping: bool = False
    # index -> [pid, start time]: what a restarted service checks
    pids: dict[int, list[int]] = field(default_factory=dict)
    stored_demand: dict[str, float] | None = None
    deadline: float = 0.0  # epoch seconds; 0: none
    # accounting (see .local_accounting): what it holds from its start, its end, STOP sent?
    usage: dict | None = None
    usage_end: int | None = None
    usage_sent: str = ""

    @property
    def owner(self) -> str:
        return f"batch:{self.record.group}/{self.record.name}"

    def demand(self) -> dict[str, float]:
        if self.request is None:
            return dict(self.stored_demand or {})
        sel, par = self.request.selection, self.request.parallelism
        need = {"cpu": sel.size.cpu * par, "memory": sel.size.memory_bytes * par, "jobs": 1}
        if sel.accelerator is not None:
            need[f"acc:{sel.accelerator.name}"] = sel.count * par
        return need
