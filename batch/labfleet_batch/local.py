"""The single-node backend: batch jobs as local processes, same API as Kueue's.

- **Queues**: the quota configuration of :mod:`.queues` is read as limits on
  what a group's *running* jobs hold at once (CPU, memory, accelerators and
  ``max_running``). Waiting jobs are ordered like Kueue's BestEffortFIFO
  (priority, then submission time); a job that does not fit lets smaller ones
  behind it start. No borrowing and no preemption here.
- **Accelerators**: taken from a :class:`labfleet_spawner.devices.DeviceAllocator`
  exclusively, all-or-nothing, under the owner ``batch:<group>/<name>``. The
  batch service is a process of its own: with ``device_claims_path`` (the
  hub's ``LocalGPUSpawner.device_claims_path``) its claims and the hub's share
  one registry, so notebooks and jobs never get the same device; a job that
  waits for a device a notebook holds is retried every ``poll_interval``. In
  the hub's own process, passing the hub's allocator does the same. Without
  either, give the service devices of its own.
- **Processes**: one per completion index, at most ``parallelism`` at once,
  each in its own session (cancel and deadline kill the whole process group),
  running as the user's mapped uid/gid when the service is root -- the same
  ids and folders as the local spawner (:mod:`labfleet_spawner.storage`).
- **Logs**: ``<workdir>/logs/<index>.log`` in the job's folder in the user's home;
  each completion's exit status goes to ``<index>.exit`` next to it (written by
  a small ``/bin/sh`` wrapper, so it is known even if the service was down).
- **Restarts**: with a :class:`~.store.JobStore`, records survive the service.
  :meth:`LocalBackend.restore` reloads them: a job whose processes still run
  (same pid *and* start time) is watched again until they end; one whose
  processes are gone is finished from its exit status files; a job that was
  still waiting goes back into the queue, its stored request checked again
  against the current configuration (:mod:`.local_restore`; failed with a
  message when that refuses it, or for rows without a request). Then the
  batch claims in the shared registry that no restored job holds are dropped,
  and only then may waiting jobs start.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from labfleet_hub.posix_ids import HubIds
from labfleet_spawner import accounts
from labfleet_spawner.catalogue import Catalogue, parse_quantity
from labfleet_spawner.devices import (
    DeviceAllocator,
    DeviceClaimsError,
    FpgaDevice,
    NoFreeDevice,
    cuda_visible_devices,
)
from labfleet_spawner.local import _chdir_only, _drop_privileges
from labfleet_spawner.storage import (
    DEFAULT_GID_BASE,
    DEFAULT_UID_BASE,
    StorageLayout,
    apply_storage,
    check_id_ranges,
    mapped_gid,
    mapped_uid,
    plan_storage,
)

from . import jobs as jobbuilder
from .local_restore import requeue, stored_request
from .model import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    LogsUnavailable,
)
from .queues import QueueConfig
from .store import JobStore, alive, process_start_time
from .validation import BatchRequest, Limits

log = logging.getLogger(__name__)

#: The batch service's side in the device claims registry shared with the hub.
CLAIMS_COMPONENT = "batch"

#: Runs a completion and records its exit status in a file (``$1``) that outlives this
#: service. A command that is not found is said so, naming the command and the PATH
#: it was looked up in (the shell would name this wrapper instead).
EXIT_WRAPPER = (
    'x=$1; shift; rc=0; if command -v -- "$1" >/dev/null 2>&1; then "$@" || rc=$?; '
    'else echo "labfleet-batch: $1: command not found (PATH=$PATH)"; rc=127; fi; '
    'echo "$rc" > "$x.tmp" && mv -f "$x.tmp" "$x"; exit "$rc"'
)


def nonzero_exit_message(codes: dict[int, int]) -> str:
    """Why a job failed, for a person: which completions, with which exit codes."""
    shown = list(codes.items())[:10]
    parts = [f"{i} (exit code {c}{': command not found' if c == 127 else ''})" for i, c in shown]
    more = f" and {len(codes) - len(shown)} more" if len(codes) > len(shown) else ""
    word = "completion" if len(codes) == 1 else "completions"
    return f"{word} {', '.join(parts)}{more} exited non-zero; see the logs"


@dataclass
class _Job:
    record: JobRecord
    request: BatchRequest | None  # None: restored after it had started (or without a request)
    layout: StorageLayout | None = None  # None: restored while waiting; looked up when it starts
    isolate: bool = False
    submitted: float = 0.0
    devices: list = field(default_factory=list)
    procs: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    task: asyncio.Task | None = None
    cancelled: bool = False
    # index -> [pid, start time]: what a restarted service checks
    pids: dict[int, list[int]] = field(default_factory=dict)
    stored_demand: dict[str, float] | None = None
    deadline: float = 0.0  # epoch seconds; 0: none

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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalBackend:
    """Runs jobs on this machine; see the module docstring."""

    def __init__(
        self,
        config: QueueConfig,
        storage_root: str,
        allocator: DeviceAllocator | None = None,
        hub_ids: HubIds | None = None,
        isolate: bool | None = None,
        uid_base: int = DEFAULT_UID_BASE,
        gid_base: int = DEFAULT_GID_BASE,
        kill_grace: float = 5.0,
        path: str = "/usr/local/bin:/usr/bin:/bin",
        store: JobStore | None = None,
        poll_interval: float = 1.0,
        device_claims_path: str = "",
        accounts_dir: str = "",
        nss_wrapper_library: str | None = None,
    ):
        self.config = config
        self.storage_root = storage_root
        self.allocator = allocator or DeviceAllocator()
        if device_claims_path:
            if self.allocator.claims_path is not None:
                raise ValueError("give device_claims_path or an allocator with claims, not both")
            # The same devices, their claims shared with the hub through the registry.
            self.allocator = DeviceAllocator(
                self.allocator.devices, claims_path=device_claims_path, component=CLAIMS_COMPONENT
            )
        self.hub_ids = hub_ids
        # names for the mapped uids, as the notebooks have them (labfleet_spawner.accounts)
        library = nss_wrapper_library
        if library is None:
            library = accounts.find_nss_wrapper()
        self.accounts = None
        if accounts_dir and library:
            self.accounts = accounts.AccountsRegistry(accounts_dir)
        self.nss_env = accounts.nss_env(accounts_dir, library) if self.accounts else {}
        # Isolation needs root and the hub's ids; otherwise jobs run as the service.
        self.isolate = (os.geteuid() == 0 and hub_ids is not None) if isolate is None else isolate
        self.uid_base, self.gid_base = uid_base, gid_base
        self.kill_grace = kill_grace
        self.path = path
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._seq = 0
        self.store = store
        self.poll_interval = poll_interval
        # A scheduling pass due because a job waits for a device another process
        # (the hub) holds: that process cannot tell us when it gives it back.
        self._retry: asyncio.TimerHandle | None = None
        # No job starts until restore has seen every record: a running one that is not
        # loaded yet holds quota and devices that a waiting one must not get.
        self._restoring = False

    # -- identity and folders --------------------------------------------------------

    async def _layout(self, user: str, group: str) -> StorageLayout:
        if self.isolate:
            user_id, groups = await self.hub_ids(user)
            check_id_ranges(self.uid_base, self.gid_base, user_id, groups.values())
            uid = mapped_uid(user_id, self.uid_base)
            gids = {g: mapped_gid(i, self.gid_base) for g, i in groups.items()}
            layout = plan_storage(self.storage_root, user, uid=uid, gid=uid, groups=gids)
            if self.accounts is not None:
                try:
                    await asyncio.to_thread(
                        self.accounts.register, accounts.Account.from_layout(layout)
                    )
                except OSError as e:  # names are a comfort, not a reason to refuse the job
                    log.error("Cannot record the account of %s: %s", user, e)
        else:
            layout = plan_storage(
                self.storage_root, user, os.geteuid(), os.getegid(), {group: os.getegid()}
            )
        await asyncio.to_thread(apply_storage, layout, as_root=self.isolate)
        return layout

    # -- API -----------------------------------------------------------------------------

    async def submit(self, request: BatchRequest, user: str) -> JobRecord:
        name = jobbuilder.new_job_name(request.name)
        layout = await self._layout(user, request.group)
        sel = request.selection
        record = JobRecord(
            name=name,
            group=request.group,
            user=user,
            state=QUEUED,
            display_name=request.name,
            created=_now(),
            profile=sel.profile.name,
            accelerator=sel.accelerator.name if sel.accelerator else None,
            count=sel.count,
            priority=request.priority,
            completions=request.completions,
            parallelism=request.parallelism,
            workdir=jobbuilder.workdir_for(str(layout.home), name),
            offload=False,
        )
        job = _Job(record, request, layout, self.isolate)
        # Its folder, script, files and logs folder first, while nobody knows the job: a
        # scheduling pass (another job finishing) during this await must not find it, or it
        # would start before its files exist (issue 17). From here on no await until the
        # job is queued and stored, so it is seen complete or not at all.
        await asyncio.to_thread(self._prepare_workdir, job)
        self._seq += 1
        job.submitted = self._seq
        self._jobs[(request.group, name)] = job
        self._save(job)
        self._schedule()
        return record

    async def list_jobs(self, groups: list[str], owner: str | None = None) -> list[JobRecord]:
        wanted = set(groups)
        out = [
            self._refresh(j)
            for j in self._jobs.values()
            if j.record.group in wanted and (owner is None or j.record.user == owner)
        ]
        return sorted(out, key=lambda r: (r.created or "", r.name))

    async def get(self, group: str, name: str) -> JobRecord | None:
        job = self._jobs.get((group, name))
        return self._refresh(job) if job else None

    async def logs(self, group: str, name: str, index: int) -> str:
        job = self._jobs.get((group, name))
        if job is None:
            raise KeyError(name)
        path = Path(job.record.workdir) / "logs" / f"{index}.log"
        if not path.exists():
            raise LogsUnavailable(f"completion {index} has not started yet")
        return await asyncio.to_thread(path.read_text, errors="replace")

    async def cancel(self, group: str, name: str) -> JobRecord:
        job = self._jobs.get((group, name))
        if job is None:
            raise KeyError(name)
        if job.record.state in FINAL_STATES:
            return self._refresh(job)
        job.cancelled = True
        if job.task is not None:
            await self._kill_all(job)
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        self._finish(job, CANCELLED, "cancelled by request")
        return self._refresh(job)

    async def close(self) -> None:
        """Cancel everything (service shutdown)."""
        for (group, name), job in list(self._jobs.items()):
            if job.record.state not in FINAL_STATES:
                await self.cancel(group, name)
        # after the cancels: each of them may have scheduled a retry
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    # -- persistence -------------------------------------------------------------------

    def _save(self, job: _Job) -> None:
        if self.store is None:
            return
        extra = {
            "demand": job.demand(),
            "devices": [d.uuid for d in job.devices],
            "pids": job.pids,
            "submitted": job.submitted,
            "deadline": job.deadline,
        }
        if job.request is not None and job.record.state == QUEUED:
            # Only while it waits: once started its script and files are in its folder and a
            # restart follows its processes; its env values are not kept longer than needed.
            extra["request"] = stored_request(job.request)
        self.store.save(job.record, extra)

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
        self._reconcile_claims()
        self._schedule()
        return len(loaded)

    def _restore_records(self, loaded, catalogue: Catalogue | None, limits: Limits | None) -> int:
        requeued = 0
        for record, extra in loaded:
            job = _Job(
                record,
                None,
                submitted=extra.get("submitted", 0),
                pids={int(i): p for i, p in (extra.get("pids") or {}).items()},
                stored_demand=extra.get("demand") or {},
                deadline=extra.get("deadline", 0),
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

    async def _watch_restored(self, job: _Job) -> None:
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

    def _conclude_restored(self, job: _Job) -> None:
        """Finish a restored job from the exit status files of its completions."""
        logs = Path(job.record.workdir) / "logs"
        codes: dict[int, int | None] = {}
        for index in range(job.record.completions):
            try:
                codes[index] = int((logs / f"{index}.exit").read_text().strip())
            except (OSError, ValueError):
                codes[index] = None
        job.record.succeeded = sum(1 for c in codes.values() if c == 0)
        job.record.failed = len(codes) - job.record.succeeded
        if not job.record.failed:
            self._finish(job, SUCCEEDED, "")
            return
        unknown = [str(i) for i, c in codes.items() if c is None]
        why = []
        bad = {i: c for i, c in codes.items() if c not in (0, None)}
        if bad:
            why.append(nonzero_exit_message(bad))
        if unknown:
            why.append(
                f"completion(s) {', '.join(unknown[:10])} left no exit status (not started, or "
                "ended while the batch service was down)"
            )
        self._finish(job, FAILED, "; ".join(why))

    async def _kill_restored(self, job: _Job) -> None:
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

    # -- queueing ------------------------------------------------------------------------

    def _refresh(self, job: _Job) -> JobRecord:
        record = job.record
        if record.state == QUEUED:
            waiting = self._waiting(record.group)
            position = next((i + 1 for i, j in enumerate(waiting) if j is job), None)
            record.queue = {
                "admitted": False,
                "position": position,
                "position_source": "local",
                "pending_in_queue": len(waiting),
                "reason": record.queue.get("reason", "Pending"),
                "message": record.queue.get("message", ""),
            }
        return record

    def _waiting(self, group: str | None = None) -> list[_Job]:
        priorities = self.config.priorities
        waiting = [
            j
            for j in self._jobs.values()
            if j.record.state == QUEUED and not j.cancelled and group in (None, j.record.group)
        ]
        return sorted(waiting, key=lambda j: (-priorities.get(j.request.priority, 0), j.submitted))

    def usage(self, group: str) -> dict[str, float]:
        """What ``group``'s running jobs hold: cpu, memory (bytes), ``acc:<name>``, jobs."""
        used: dict[str, float] = {}
        for job in self._jobs.values():
            if job.record.group == group and job.record.state == RUNNING:
                for key, value in job.demand().items():
                    used[key] = used.get(key, 0) + value
        return used

    def _fits(self, job: _Job) -> str:
        """ "" when ``job`` fits its group's quota now, else why not."""
        quota = self.config.groups[job.record.group]
        used = self.usage(job.record.group)
        need = job.demand()
        limits = {"cpu": quota.cpu, "memory": parse_quantity(quota.memory)}
        for acc, count in quota.accelerators.items():
            limits[f"acc:{acc}"] = count
        if quota.max_running:
            limits["jobs"] = quota.max_running
        for key, value in need.items():
            if key not in limits:
                continue
            if used.get(key, 0) + value > limits[key]:
                what = key.removeprefix("acc:")
                return (
                    f"insufficient quota for {what} in group {job.record.group}: "
                    f"{used.get(key, 0):g} in use + {value:g} requested > {limits[key]:g}"
                )
        return ""

    def _schedule(self) -> None:
        if self._restoring:
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for job in self._waiting():
            why = self._fits(job)
            if not why and job.request.selection.accelerator is not None:
                sel = job.request.selection
                try:
                    job.devices = self.allocator.allocate(
                        job.owner, sel.accelerator, sel.count * job.request.parallelism
                    )
                except NoFreeDevice as e:
                    why = str(e)
                    # A device the hub frees comes back without an event here: look again.
                    if self.allocator.claims_path is not None and self._retry is None:
                        self._retry = asyncio.get_running_loop().call_later(
                            self.poll_interval, self._schedule
                        )
            if why:
                job.record.queue = {"reason": "Pending", "message": why}
                continue
            job.record.state = RUNNING
            job.record.queue = {"admitted": True, "position": 0, "reason": "", "message": ""}
            job.deadline = time.time() + job.request.max_run_time
            self._save(job)
            job.task = asyncio.get_running_loop().create_task(self._run(job))

    # -- running ------------------------------------------------------------------------

    def _prepare_workdir(self, job: _Job) -> None:
        workdir = Path(job.record.workdir)
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        for name, content in job.request.files.items():
            (workdir / name).write_text(content)
        if job.request.script is not None:
            (workdir / ".labfleet-job.sh").write_text(job.request.script + "\n")
        if job.isolate:
            owner = (job.layout.uid, job.layout.gid)
            for path in (workdir.parent, workdir, *workdir.rglob("*")):
                os.chown(path, *owner, follow_symlinks=False)

    def _env(self, job: _Job, index: int, devices: list) -> dict[str, str]:
        layout = job.layout
        env = {
            **job.request.env,
            # the notebook's PATH when the client sent it (a job runs the same software)
            "PATH": job.request.env.get("PATH") or self.path,
            "USER": job.record.user,
            "HOME": str(layout.home),
            "SHELL": "/bin/sh",
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **layout.env(),
            "LABFLEET_BATCH_JOB": job.record.name,
            "LABFLEET_BATCH_GROUP": job.record.group,
            "LABFLEET_BATCH_WORKDIR": job.record.workdir,
            "JOB_COMPLETION_INDEX": str(index),
            "LABFLEET_CPU_LIMIT": str(job.request.selection.size.cpu),
            "LABFLEET_MEM_LIMIT": str(job.request.selection.size.memory_bytes),
            **(self.nss_env if job.isolate else {}),
        }
        visible = cuda_visible_devices(devices)
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["NVIDIA_VISIBLE_DEVICES"] = visible or "none"
        fpgas = [d.uuid for d in devices if isinstance(d, FpgaDevice)]
        if fpgas:
            env["LABFLEET_FPGA_DEVICES"] = ",".join(fpgas)
        return env

    async def _run_index(self, job: _Job, index: int, devices: list) -> int:
        workdir = Path(job.record.workdir)
        if job.request.script is not None:
            script = job.request.script
            argv = (
                [str(workdir / ".labfleet-job.sh")]
                if script.startswith("#!")
                else ["/bin/sh", str(workdir / ".labfleet-job.sh")]
            )
        else:
            argv = list(job.request.command)
        layout = job.layout
        preexec = (
            _drop_privileges(layout.uid, layout.gid, layout.supplementary_gids, str(workdir))
            if job.isolate
            else _chdir_only(str(workdir))
        )
        log_path = workdir / "logs" / f"{index}.log"
        with open(log_path, "ab") as out:
            if job.isolate:
                os.chown(log_path, layout.uid, layout.gid)
            if job.request.script is not None:
                os.chmod(workdir / ".labfleet-job.sh", 0o700)
            exit_path = workdir / "logs" / f"{index}.exit"
            with contextlib.suppress(FileNotFoundError):
                exit_path.unlink()
            try:
                proc = await asyncio.create_subprocess_exec(
                    "/bin/sh",
                    "-c",
                    EXIT_WRAPPER,
                    "labfleet-job",
                    str(exit_path),
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self._env(job, index, devices),
                    preexec_fn=preexec,
                    start_new_session=True,  # its own process group: kill it whole
                )
            except OSError as e:
                out.write(f"labfleet-batch: cannot start {argv[0]}: {e}\n".encode())
                return 127
        job.procs[index] = proc
        job.pids[index] = [proc.pid, process_start_time(proc.pid) or 0]
        job.record.active += 1
        self._save(job)
        try:
            return await proc.wait()
        finally:
            job.record.active -= 1
            job.procs.pop(index, None)
            job.pids.pop(index, None)

    async def _run(self, job: _Job) -> None:
        if job.layout is None:  # queued again after a restart: its folders are looked up now
            try:
                job.layout = await self._layout(job.record.user, job.record.group)
            except Exception as e:  # the hub's ids, the folders: say why, never hang running
                self._finish(job, FAILED, f"cannot prepare the job's user and folders: {e}")
                return
        req = job.request
        per = req.selection.count
        slots = [job.devices[i * per : (i + 1) * per] for i in range(req.parallelism)]
        free_slots: asyncio.Queue = asyncio.Queue()
        for slot in slots:
            free_slots.put_nowait(slot)

        async def one(index: int) -> int:
            slot = await free_slots.get()
            try:
                return await self._run_index(job, index, slot)
            finally:
                free_slots.put_nowait(slot)

        tasks = [asyncio.ensure_future(one(i)) for i in range(req.completions)]
        try:
            codes = await asyncio.wait_for(asyncio.gather(*tasks), req.max_run_time)
        except TimeoutError:
            await self._kill_all(job)
            self._finish(job, FAILED, f"exceeded max_run_time of {req.max_run_time} s")
            return
        except asyncio.CancelledError:
            await self._kill_all(job)
            raise
        except Exception as e:
            # e.g. its folder was removed while it waited: the job must end, not stay
            # "running" with its quota and devices held forever
            log.exception("Job %s could not run", job.owner)
            await self._kill_all(job)
            self._finish(job, FAILED, f"could not start the job's processes: {e}")
            return
        job.record.succeeded = sum(1 for c in codes if c == 0)
        job.record.failed = len(codes) - job.record.succeeded
        if job.cancelled:
            return
        if job.record.failed:
            bad = {i: c for i, c in enumerate(codes) if c != 0}
            self._finish(job, FAILED, nonzero_exit_message(bad))
        else:
            self._finish(job, SUCCEEDED, "")

    async def _kill_all(self, job: _Job) -> None:
        if job.request is None:
            await self._kill_restored(job)
            return
        procs = list(job.procs.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), self.kill_grace)
        except TimeoutError:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        if job.task is not None and job.task is not asyncio.current_task():
            job.task.cancel()

    def _finish(self, job: _Job, state: str, message: str) -> None:
        if job.record.state in FINAL_STATES:
            return
        job.record.state = state
        job.record.message = message
        job.record.queue = {"finished": True}
        job.pids = {}
        self._save(job)
        try:
            released = self.allocator.release(job.owner)
        except DeviceClaimsError as e:
            # The job is over whatever the registry says; the claim stays until it is repaired.
            log.error("Cannot release devices of %s: %s", job.owner, e)
            released = []
        if released:
            log.info("Released %s from %s", ", ".join(released), job.owner)
        job.devices = []
        # Freed quota or devices may let waiting jobs start.
        with contextlib.suppress(RuntimeError):
            self._schedule()
