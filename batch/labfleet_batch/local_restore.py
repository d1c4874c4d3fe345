"""Restarts of the local backend: reloading its jobs, and queueing waiting jobs again.

:class:`RestoreMixin` (part of :class:`~.local.LocalBackend`) reloads the store's
rows: running jobs are followed again (or concluded from their exit status files
by ``LocalBackend._conclude_restored``), waiting ones queued again, what is owed
to accounting sent again (:mod:`.local_accounting`), stale device claims dropped.

What the backend keeps of a waiting job so that a restarted service can queue it again:

A job that waits for quota or a device has nothing on disk but its folder;
without its request a restart would have to fail it. So while it waits, its
store row (``extra["request"]``) holds its request, and :func:`requeue` turns
that back into a :class:`~.validation.BatchRequest` when the service starts.

What is stored is the *submission* (:func:`~.validation.request_fields`, the
inverse of :func:`~.validation.validate_request`), not the validated objects,
and it is checked again by the same :func:`~.validation.validate_request`
against the catalogue, queue configuration and limits the restarted service
runs with. A pickled or field-by-field copy of the ``BatchRequest`` would
start the job with a profile, size or accelerator the new configuration may
no longer have; checking again refuses what is gone, by name, with the very
messages a new submission would get. Defaults are stored as they were
resolved at submit time, so the job that starts is the one whose profile and
accelerator its status showed, not a new default.

Not checked again: the submitter's group membership, which the backend cannot
ask the hub for; the groups stored with the request are the ones the hub gave
at submit time (as for a job that was already running).

The request holds the user's script, files and environment: it is kept only
while the job waits (dropped from the row when it starts), in the store's
0600 file, and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from labfleet_spawner.catalogue import Catalogue
from labfleet_spawner.devices import DeviceClaimsError

from .local_accounting import SENT_STOP
from .local_job import LocalJob
from .model import FAILED, FINAL_STATES, QUEUED, RUNNING
from .queues import QueueConfig
from .store import alive
from .validation import BatchRequest, Limits, RequestError, request_fields, validate_request

# the backend's logger: restart messages read as they did when this lived in local.py
log = logging.getLogger("labfleet_batch.local")

#: The message of a waiting job whose row has no request (written before requests were
#: stored, or by a service without a catalogue to check them against).
NOT_STORED = "the batch service restarted before this job started; submit again"


def stored_request(request: BatchRequest) -> dict[str, Any]:
    """What a store row keeps of a waiting job's request (plain JSON)."""
    return {"fields": request_fields(request), "user_groups": list(request.user_groups)}


def requeue(
    stored: Any,
    *,
    catalogue: Catalogue | None,
    config: QueueConfig,
    limits: Limits | None,
    group: str,
) -> tuple[BatchRequest | None, str]:
    """The request of a job that waited when the service stopped, checked again.

    Returns ``(request, "")``, or ``(None, why)`` with a message for the job's
    owner: nothing stored, or what the current configuration no longer offers.
    """
    if not stored:
        return None, NOT_STORED
    if catalogue is None:
        return None, f"{NOT_STORED} (the service had no catalogue to check it against)"
    try:
        fields, user_groups = stored["fields"], stored.get("user_groups") or [group]
        request = validate_request(
            fields,
            catalogue=catalogue,
            user_groups=user_groups,
            # what the service offers a submitter: every group with a queue that they are in
            # (validate_request keeps only those among user_groups, as Policy.can_submit does)
            queue_groups=config.covered_accelerators(),
            priorities=config.priorities,
            default_priority=config.default_priority,
            offload_available=config.offload_enabled,
            limits=limits,
        )
    except RequestError as e:
        return None, (
            f"the batch service restarted with a changed configuration and this waiting job "
            f"no longer passes its checks: {e}; submit again"
        )
    except (KeyError, TypeError, AttributeError):
        return None, f"{NOT_STORED} (its stored request is unreadable)"
    if request.group != group:  # a row edited by hand: never move a job to another group
        return None, f"{NOT_STORED} (its stored request is for another group)"
    return request, ""


class RestoreMixin:
    """The restart half of :class:`~.local.LocalBackend` (its attributes and methods)."""

    async def restore(
        self, catalogue: Catalogue | None = None, limits: Limits | None = None
    ) -> int:
        """Reload the stored jobs and reconcile those that were not finished; returns how many.

        Waiting jobs are queued again once their stored requests pass the
        checks of a new submission against ``catalogue``, this backend's queue
        configuration and ``limits`` (the service's). Then drop the batch
        claims no restored job holds (a shared registry keeps those of an
        earlier service process; the hub's stay) and start what fits.
        """
        loaded = await asyncio.to_thread(self.store.load) if self.store is not None else []
        self._restoring = True
        try:
            requeued = self._restore_records(loaded, catalogue, limits)
        finally:
            self._restoring = False
        if loaded:
            log.info(
                "Restored %d batch job record(s), %d of them waiting again", len(loaded), requeued
            )
        self._resend_usage()
        self._reconcile_claims()
        self._schedule()
        return len(loaded)

    def _restore_records(self, loaded, catalogue: Catalogue | None, limits: Limits | None) -> int:
        requeued = 0
        for record, extra in loaded:
            job = LocalJob(
                record,
                None,
                submitted=extra.get("submitted", 0),
                pids={int(i): p for i, p in (extra.get("pids") or {}).items()},
                stored_demand=extra.get("demand") or {},
                deadline=extra.get("deadline", 0),
                usage=extra.get("usage"),
                usage_end=extra.get("usage_end"),
                usage_sent=extra.get("usage_sent", ""),
            )
            self._seq = max(self._seq, job.submitted)
            self._jobs[(record.group, record.name)] = job
            if record.state == QUEUED:
                job.request, why = requeue(
                    extra.get("request"),
                    catalogue=catalogue,
                    config=self.config,
                    limits=limits,
                    group=record.group,
                )
                if job.request is None:
                    if extra.get("request"):  # names what is gone; never values
                        log.warning("Not queueing %s again: %s", record.id, why)
                    self._finish(job, FAILED, why)
                else:
                    job.isolate = self.isolate
                    requeued += 1
            elif record.state == RUNNING:
                uuids = extra.get("devices", [])
                try:
                    job.devices, problems = self.allocator.restore(job.owner, uuids)
                except DeviceClaimsError as e:
                    # Keep the record, so that a restart after the repair claims them again.
                    job.devices, problems = self.allocator.known_devices(uuids), [str(e)]
                for problem in problems:
                    log.warning("Restoring %s: %s", record.id, problem)
                job.record.active = sum(1 for p in job.pids.values() if alive(*p))
                if job.record.active:
                    job.task = asyncio.get_running_loop().create_task(self._watch_restored(job))
                else:
                    self._conclude_restored(job)
        return requeued

    def _resend_usage(self) -> None:
        """START of each restored running job, STOP of each ended job whose STOP is owed."""
        if self.accounting is None:
            return
        events = []
        for job in self._jobs.values():
            if job.usage is None:
                continue
            if job.record.state == RUNNING:
                events.append(self.accounting.start_event(job.usage))
            elif job.record.state in FINAL_STATES and job.usage_sent != SENT_STOP:
                end = job.usage_end if job.usage_end is not None else self.accounting.now()
                job.usage_end = end
                events.append(self.accounting.stop_event(job.usage, end))
                self._owed[(job.record.group, job.record.name)] = job
        if events:
            self._send_usage(events)  # marks and saves the owed ones once they are in

    def _reconcile_claims(self) -> None:
        try:
            stale = self.allocator.reconcile()
        except DeviceClaimsError as e:
            log.error("Cannot reconcile device claims: %s", e)
            return
        for uuid, owner in stale:
            log.warning(
                "Dropped stale device claim: %s was held by %s, which the batch service "
                "no longer runs",
                uuid,
                owner,
            )

    async def _watch_restored(self, job: LocalJob) -> None:
        """Poll the processes a previous service started until they end (or the deadline)."""
        while True:
            running = [p for p in job.pids.values() if alive(*p)]
            job.record.active = len(running)
            if not running:
                break
            if job.deadline and time.time() > job.deadline:
                await self._kill_restored(job)
                self._finish(job, FAILED, "exceeded max_run_time (after a service restart)")
                return
            await asyncio.sleep(self.poll_interval)
        if not job.cancelled:
            self._conclude_restored(job)

    async def _kill_restored(self, job: LocalJob) -> None:
        live = [pid for pid, start in job.pids.values() if alive(pid, start)]
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while time.monotonic() < deadline and any(alive(*p) for p in job.pids.values()):
            await asyncio.sleep(0.1)
        for pid, start in job.pids.values():
            if alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        if job.task is not None and job.task is not asyncio.current_task():
            job.task.cancel()
