"""Usage of local batch jobs for accounting: one interval per job, through the accounting spool.

Single-node mode has no pods for the accounting service to watch. The local
spawner reports notebook servers through a spool file
(:mod:`labfleet_accounting.spool`); the local backend reports its jobs the
same way: the same file, the same ingest (``SpoolCollector``), the same
idempotent ledger. The batch service never opens the accounting database.

**What is recorded**: one interval per job that started (was admitted: its
quota and devices were taken), whatever its end -- succeeded, failed, timed
out (``max_run_time``), cancelled while running, or concluded by a restarted
service. A job cancelled (or refused after a restart) while it waited used
nothing and is not recorded. The interval is a
:class:`labfleet_accounting.records.Usage` with source ``local-batch``, uid
``<group>/<name>`` (the job id), kind ``batch``, the submitter, the job's
group (the one charged, as on Kubernetes), profile and accelerator (kind and
MIG fraction from the catalogue), start = the second it was admitted, end =
the second it concluded, and what the job holds while it runs: the local
backend holds ``parallelism`` slots of its size (CPU, memory, ``count``
devices each) from admission to the end, so ``cpu``, ``memory`` and
``accelerator_count`` are the per-completion amounts times ``parallelism``.
The job's final state stays in the batch service's job store (same id).

**Exactly once** (the ledger's natural key ``(source, uid, start)`` absorbs
repeats; the first end written wins):

- the usage, with its start, is saved in the job's store row *before* the
  START event is appended, so the start never changes once announced;
- at the end, the end second is fixed, the STOP event appended and the job's
  final row saved with the end and whether the STOP reached the spool;
- a restarted service appends START again for the running jobs it restores
  (one killed between its row and its START) and STOP for every finished job
  whose STOP did not reach the spool, with the stored end;
- a job a restarted service concludes from its exit status files ends at the
  last of them (or its logs) to be written, not at the restart;
- a spool that cannot be written (full disk) is logged; its events are tried
  again with the next append, and by the next service from the store rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from labfleet_accounting.records import START, STOP, Event, Usage
from labfleet_accounting.spool import append_events
from labfleet_hub.contract import KIND_BATCH

from . import jobfs
from .model import JobRecord
from .validation import BatchRequest

log = logging.getLogger(__name__)

#: Ledger source of local batch jobs (notebook servers are ``local``, pods ``k8s``).
SOURCE = "local-batch"
#: What a store row says about the job's STOP: not sent yet, or in the spool.
SENT_STOP = "stop"


def job_usage(record: JobRecord, request: BatchRequest, start: int) -> dict[str, Any]:
    """The usage of a job admitted at ``start``, as plain data for its store row."""
    sel, par = request.selection, request.parallelism
    acc = sel.accelerator
    usage = Usage(
        source=SOURCE,
        uid=record.id,
        start=int(start),
        user=record.user,
        group=record.group,
        kind=KIND_BATCH,
        profile=sel.profile.name,
        accelerator=acc.name if acc else "",
        accelerator_kind=acc.kind if acc else "",
        accelerator_count=sel.count * par if acc else 0,
        gpu_fraction=float(acc.gpu_fraction if acc else 1.0),
        cpu=float(sel.size.cpu) * par,
        memory=int(sel.size.memory_bytes) * par,
        name=record.name,
    )
    return asdict(usage)


def ended_at(folder: jobfs.JobFolder | None, completions: int, start: int, now: int) -> int:
    """When a job whose processes ended unwatched stopped: its last exit status or log write.

    Each completion's log is opened when it starts and its ``<index>.exit`` is
    written when it ends, so the latest of them is the last sign of the job;
    never before ``start`` nor after ``now``. Read through :mod:`.jobfs`: the
    folder is the user's.
    """
    latest = start
    for index in range(completions if folder is not None else 0):
        for name in (f"{index}.exit", f"{index}.log"):
            written = jobfs.mtime(folder, "logs", name)
            if written is not None:
                latest = max(latest, int(written))
    return min(latest, now)


class JobAccounting:
    """Appends the START and STOP events of local batch jobs to the accounting spool."""

    def __init__(self, spool_path: str, clock=time.time):
        self.path = spool_path
        self.clock = clock
        # events that could not be appended, tried again with the next ones
        self._pending: dict[tuple[str, str, int], Event] = {}

    def now(self) -> int:
        return int(self.clock())

    def send(self, events: list[Event]) -> bool:
        """Append ``events`` (and any earlier ones that failed); False if they could not be."""
        for event in events:
            self._pending[(event.type, event.usage.uid, event.usage.start)] = event
        if not self._pending:
            return True
        batch = list(self._pending.values())
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            append_events(self.path, batch)
        except OSError as e:
            # never fails a job: the store rows keep what is owed, tried again later
            log.error(
                "Accounting spool %s: cannot record %d batch event(s), will retry: %s",
                self.path,
                len(batch),
                e,
            )
            return False
        self._pending.clear()
        return True

    def start_event(self, usage: dict[str, Any]) -> Event:
        parsed = Usage.from_dict(usage)
        return Event(START, parsed, parsed.start)

    def stop_event(self, usage: dict[str, Any], end: int) -> Event:
        parsed = Usage.from_dict(usage)
        return Event(STOP, parsed, max(int(end), parsed.start))
