"""Single-node collection: the local spawner appends events to a spool, the service ingests them.

The hub process must not wait on (or fail because of) the accounting
database, so :class:`SpoolHook` only appends one JSON line per server start
or stop to a spool file, under an exclusive lock and with ``fsync``: once
``started``/``stopped`` return, the event survives a crash of either process.

:class:`SpoolCollector` (in the accounting service) reads complete lines
from the byte offset saved as its checkpoint and applies them in batches,
each batch in one transaction with the new offset. Killed anywhere, it
restarts from the last committed offset and the idempotent ledger absorbs
the replayed part of the batch.

Hook into the local spawner (see docs/accounting.md)::

    hook = SpoolHook(path="/var/lib/labfleet/accounting.spool")
    hook.started(spawner)   # after the server process started
    hook.stopped(spawner)   # after it stopped (or was found dead)
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from pathlib import Path

from labfleet_hub.contract import KIND_INTERACTIVE
from traitlets import Float, Integer, Unicode
from traitlets.config import LoggingConfigurable

from .records import START, STOP, Event, Usage

SOURCE = "local"
#: Spawner attribute (and state key) holding the start time the hook recorded.
STATE_START = "labfleet_accounting_start"


def spawner_usage(spawner, start: int) -> Usage:
    """The :class:`Usage` of a local spawner's server (duck-typed: LocalGPUSpawner)."""
    selection = getattr(spawner, "selection", None)
    accelerator = getattr(selection, "accelerator", None) if selection else None
    profile = getattr(selection, "profile", None) if selection else None
    return Usage(
        source=SOURCE,
        uid=f"{spawner.user.name}/{spawner.name or ''}",
        start=int(start),
        user=spawner.user.name,
        # the spawner's own rule (labfleet_spawner.objects.accounting_group), so a
        # session is charged to the same group locally, on Kubernetes and in budgets
        group=spawner.charged_group() if hasattr(spawner, "charged_group") else "",
        kind=KIND_INTERACTIVE,
        profile=getattr(profile, "name", "") or "",
        accelerator=getattr(accelerator, "name", "") or "",
        accelerator_kind=getattr(accelerator, "kind", "") or "",
        accelerator_count=int(getattr(selection, "count", 0) or 0) if accelerator else 0,
        gpu_fraction=float(getattr(accelerator, "gpu_fraction", 1.0) or 1.0),
        cpu=float(getattr(spawner, "cpu_limit", 0) or 0),
        memory=int(getattr(spawner, "mem_limit", 0) or 0),
        name=spawner.name or "",
    )


def append_events(path: str | os.PathLike, events: list[Event]) -> None:
    """Append events durably: one locked write of whole lines, then fsync."""
    data = "".join(json.dumps(e.as_dict(), sort_keys=True) + "\n" for e in events).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # several hub threads or processes
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolHook(LoggingConfigurable):
    """What the local spawner calls on server start and stop. Never raises into the hub."""

    path = Unicode(
        "/var/lib/labfleet/accounting.spool",
        config=True,
        help="Spool file shared with the accounting service (append-only JSON lines).",
    )

    def __init__(self, clock=time.time, **kwargs):
        super().__init__(**kwargs)
        self.clock = clock

    def _append(self, event: Event) -> None:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            append_events(self.path, [event])
        except OSError as e:
            # Accounting must never stop a notebook from starting or stopping.
            self.log.error("Accounting spool %s: cannot record %s: %s", self.path, event.type, e)

    def started(self, spawner) -> int:
        """Record a start; returns the start time (keep it in the spawner's state)."""
        start = int(self.clock())
        setattr(spawner, STATE_START, start)
        self._append(Event(START, spawner_usage(spawner, start), start))
        return start

    def stopped(self, spawner) -> None:
        start = getattr(spawner, STATE_START, None)
        if start is None:
            self.log.warning("Accounting: stop of %s without a recorded start", spawner.name)
            return
        end = int(self.clock())
        self._append(Event(STOP, spawner_usage(spawner, start), end))
        setattr(spawner, STATE_START, None)


class SpoolCollector(LoggingConfigurable):
    """Ingest a spool file into the ledger, exactly once."""

    path = Unicode(
        "/var/lib/labfleet/accounting.spool",
        config=True,
        help="Spool file written by SpoolHook in the hub.",
    )
    source_name = Unicode(SOURCE, config=True, help="Ledger source name of this collector.")
    batch_lines = Integer(500, config=True, help="Most spool lines written in one transaction.")
    poll_interval = Float(0.5, config=True, help="Seconds between looks for new spool lines.")

    def __init__(self, ledger, **kwargs):
        super().__init__(**kwargs)
        self.ledger = ledger

    def ingest_available(self) -> int:
        """Apply every complete line after the checkpoint; returns the number of events."""
        offset = int(self.ledger.checkpoint(self.source_name) or 0)
        applied = 0
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return 0
        with handle:
            handle.seek(offset)
            while True:
                batch, end = [], offset
                for _ in range(self.batch_lines):
                    line = handle.readline()
                    if not line.endswith(b"\n"):  # absent, or still being written
                        break
                    end += len(line)
                    batch.append(Event.from_dict(json.loads(line)))
                if end == offset:
                    return applied
                self.ledger.apply(batch, checkpoint=(self.source_name, str(end)))
                applied += len(batch)
                offset = end
                handle.seek(offset)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        while not stop.is_set():
            count = await asyncio.to_thread(self.ingest_available)
            if count:
                self.log.debug("Ingested %d spool events", count)
            try:
                await asyncio.wait_for(stop.wait(), self.poll_interval)
            except TimeoutError:
                pass
