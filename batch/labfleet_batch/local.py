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
  running as the user's mapped uid/gid -- the same ids and folders as the
  local spawner (:mod:`labfleet_spawner.storage`); a service that cannot
  (not root, no hub ids) refuses every job unless ``isolate_users`` is
  ``no`` (:mod:`labfleet_spawner.isolation`) --
  each in a PID namespace of its own, so that nothing it starts outlives it,
  its cancel or its time limit (:mod:`.local_proc`).
- **Files**: the service never writes into a job's folder by name nor reads
  anything there through a link: the folder, input files and script are
  created through directory descriptors without following links, and logs
  and exit statuses are read the same way (:mod:`.jobfs`).
- **Logs**: ``<workdir>/logs/<index>.log`` in the job's folder in the user's home,
  opened by the completion itself, as the user; each completion's exit status
  goes to ``<index>.exit`` next to it (written by a small ``/bin/sh`` wrapper,
  so it is known even if the service was down).
- **Restarts**: with a :class:`~.store.JobStore`, records survive the service.
  :meth:`LocalBackend.restore` reloads them: a job whose processes still run
  (same pid *and* start time) is watched again until they end; one whose
  processes are gone is finished from its exit status files; a job that was
  still waiting goes back into the queue, its stored request checked again
  against the current configuration (:mod:`.local_restore`; failed with a
  message when that refuses it, or for rows without a request). Then the
  batch claims in the shared registry that no restored job holds are dropped,
  and only then may waiting jobs start. That half lives in
  :class:`.local_restore.RestoreMixin`.
- **Accounting**: with a :class:`.local_accounting.JobAccounting` (the spool
  the accounting service ingests, as the local spawner's), every job that
  started is one ``batch`` usage interval, from its admission to its end,
  whatever the end; exactly once across restarts (:mod:`.local_accounting`).
- **Submission**: a job joins the queue only once its folder, script, files
  and logs folder exist, so no scheduling pass can start it earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import time
from pathlib import Path

from labfleet_hub.posix_ids import HubIds
from labfleet_spawner import accounts, isolation
from labfleet_spawner.catalogue import parse_quantity
from labfleet_spawner.devices import (
    DeviceAllocator,
    DeviceClaimsError,
    FpgaDevice,
    NoFreeDevice,
    cuda_visible_devices,
)
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

from . import jobfs, local_proc
from . import jobs as jobbuilder
from .local_accounting import SENT_STOP, JobAccounting, ended_at, job_usage
from .local_job import LocalJob as _Job
from .local_restore import RestoreMixin, stored_request
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
from .queues import GroupQuota, QueueConfig
from .store import JobStore, process_start_time
from .validation import BatchRequest, RequestError

log = logging.getLogger(__name__)

#: The batch service's side in the device claims registry shared with the hub.
CLAIMS_COMPONENT = "batch"


def nonzero_exit_message(codes: dict[int, int]) -> str:
    """Why a job failed, for a person: which completions, with which exit codes."""
    shown = list(codes.items())[:10]
    parts = [f"{i} (exit code {c}{': command not found' if c == 127 else ''})" for i, c in shown]
    more = f" and {len(codes) - len(shown)} more" if len(codes) > len(shown) else ""
    word = "completion" if len(codes) == 1 else "completions"
    return f"{word} {', '.join(parts)}{more} exited non-zero; see the logs"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalBackend(RestoreMixin):
    """Runs jobs on this machine; see the module docstring."""

    def __init__(
        self,
        config: QueueConfig,
        storage_root: str,
        allocator: DeviceAllocator | None = None,
        hub_ids: HubIds | None = None,
        isolate: bool | None = None,
        isolate_users: str = "auto",
        allow_root: bool = False,
        uid_base: int = DEFAULT_UID_BASE,
        gid_base: int = DEFAULT_GID_BASE,
        kill_grace: float = 5.0,
        path: str = "/usr/local/bin:/usr/bin:/bin",
        store: JobStore | None = None,
        poll_interval: float = 1.0,
        device_claims_path: str = "",
        accounts_dir: str = "",
        nss_wrapper_library: str | None = None,
        accounting: JobAccounting | None = None,
    ):
        self.config = config
        # None: jobs are not reported to accounting
        self.accounting = accounting
        # ended jobs whose STOP has not reached the spool yet (marked once it has)
        self._owed: dict[tuple[str, str], _Job] = {}
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
        # Isolation needs root and the hub's ids. isolate None: decided by isolate_users,
        # failing closed: when it is needed and impossible, every job is refused with
        # self.refusal (never run as the service's user, root or not). True/False: as
        # given (tests, embedding).
        self.refusal = ""
        if isolate is None:
            try:
                isolate = isolation.decide(
                    isolate_users, uid=os.geteuid(), can_isolate=hub_ids is not None,
                    why_not="the batch service does not read the users' ids from the hub "
                    "(BatchService.job_ids_from_hub)", allow_root=allow_root, what="batch jobs",
                )  # fmt: skip
            except isolation.IsolationRefused as e:
                isolate, self.refusal = False, str(e)
                log.error("Every batch job is refused: %s", e)
        self.isolate = isolate
        self.uid_base, self.gid_base = uid_base, gid_base
        # jobs of other users run in PID namespaces of their own (local_proc): required
        self.tools = local_proc.containment_tools() if self.isolate else None
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
        if self.refusal:  # nothing is created
            raise isolation.IsolationRefused(self.refusal)
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
        try:
            await asyncio.to_thread(self._prepare_workdir, job)
        except jobfs.JobFolderError as e:  # e.g. ~/batch is a link: nothing is written there
            raise RequestError(f"cannot create the job's folder: {e.strerror}") from None
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
        try:
            return await asyncio.to_thread(
                jobfs.read_text, self._folder(job), "logs", f"{index}.log"
            )
        except FileNotFoundError:
            raise LogsUnavailable(f"completion {index} has not started yet") from None
        except jobfs.JobFolderError as e:
            raise LogsUnavailable(f"cannot read the log: {e.strerror}") from None

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
        if job.usage is not None:
            extra["usage"] = job.usage
            extra["usage_end"] = job.usage_end
            extra["usage_sent"] = job.usage_sent
        if job.request is not None and job.record.state == QUEUED:
            # Only while it waits: once started its script and files are in its folder and a
            # restart follows its processes; its env values are not kept longer than needed.
            extra["request"] = stored_request(job.request)
        self.store.save(job.record, extra)

    def _conclude_restored(self, job: _Job) -> None:
        """Finish a restored job from the exit status files of its completions."""
        if job.usage is not None and job.usage_end is None and self.accounting is not None:
            # it ended unwatched: at its last exit status, not now
            job.usage_end = ended_at(
                self._folder(job),
                job.record.completions,
                job.usage["start"],
                self.accounting.now(),
            )
        folder = self._folder(job)
        codes: dict[int, int | None] = {}
        for index in range(job.record.completions):
            try:
                codes[index] = int(jobfs.read_text(folder, "logs", f"{index}.exit", limit=32))
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
                why = (
                    f"insufficient quota for {what} in group {job.record.group}: "
                    f"{used.get(key, 0):g} in use + {value:g} requested > {limits[key]:g}"
                )
                if used.get(key, 0) > limits[key]:
                    # the limit was lowered under what runs: nothing is stopped for it
                    why += (
                        "; the group's running jobs hold more than its limit, which was "
                        "lowered while they ran: they finish, and the group's jobs wait "
                        "until it is under the limit again"
                    )
                return why
        return ""

    def set_group_quota(self, quota: GroupQuota) -> None:
        """New limits for a group, at once (the quota API, :mod:`.local_limits`).

        Waiting jobs are looked at again now; running jobs are never stopped for a
        lowered limit: the group's jobs wait until it is under the limit again."""
        if quota.name not in self.config.groups:
            raise KeyError(quota.name)
        self.config.groups[quota.name] = quota
        with contextlib.suppress(RuntimeError):  # no running loop: the next pass sees it
            self._schedule()

    def _schedule(self) -> None:
        if self._restoring:
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for job in self._waiting():
            # restored waiting jobs too: none starts where jobs are refused
            why = self.refusal or self._fits(job)
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
            if self.accounting is not None:
                job.usage = job_usage(job.record, job.request, self.accounting.now())
            self._save(job)  # the usage's start is stored before it is announced
            if job.usage is not None:
                self._send_usage([self.accounting.start_event(job.usage)])
            job.task = asyncio.get_running_loop().create_task(self._run(job))

    # -- running ------------------------------------------------------------------------

    def _folder(self, job: _Job, chown: bool = False) -> jobfs.JobFolder:
        """The job's folder, for :mod:`.jobfs` (which trusts nothing inside it)."""
        workdir = Path(job.record.workdir)
        # workdir_for: <home>/batch/<name>; the record is the service's own state
        home = job.layout.home if job.layout is not None else workdir.parent.parent
        owner = (job.layout.uid, job.layout.gid) if chown and job.isolate else None
        return jobfs.JobFolder.of(home, workdir, owner)

    def _prepare_workdir(self, job: _Job) -> None:
        jobfs.prepare(self._folder(job, chown=True), job.request.files, job.request.script)

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
        user = (layout.uid, layout.gid, layout.supplementary_gids) if job.isolate else None
        try:
            proc = await asyncio.create_subprocess_exec(
                *local_proc.completion_argv(str(workdir), index, argv, user, self.tools),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                # only what fails before the wrapper has its log (unshare, setpriv, cd)
                stderr=asyncio.subprocess.PIPE,
                env=self._env(job, index, devices),
                start_new_session=True,  # its own process group: kill it whole
            )
        except OSError as e:
            log.error("Cannot start completion %d of %s: %s", index, job.owner, e)
            return 127
        job.procs[index] = proc
        if job.stopping:  # stopped while this one was being started
            local_proc.kill(proc.pid)
        job.pids[index] = [proc.pid, process_start_time(proc.pid) or 0]
        job.record.active += 1
        self._save(job)
        try:
            _, early = await proc.communicate()
            early_text = early.decode(errors="replace").strip()[-500:]
            if proc.returncode == local_proc.CANNOT_START:
                # never got to the command (its folder is gone, ...): the job fails saying so
                raise local_proc.CompletionNotStarted(early_text or "its folder is not usable")
            if early_text:
                log.warning("Completion %d of %s: %s", index, job.owner, early_text)
            return proc.returncode
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
                if job.stopping:  # the job is being stopped: this completion never starts
                    return -1
                return await self._run_index(job, index, slot)
            finally:
                free_slots.put_nowait(slot)

        tasks = [asyncio.ensure_future(one(i)) for i in range(req.completions)]
        gathered = asyncio.gather(*tasks)
        try:
            # shielded: at the time limit the completions' tasks must still hold their
            # processes, so that _kill_all finds and ends them
            codes = await asyncio.wait_for(asyncio.shield(gathered), req.max_run_time)
        except TimeoutError:
            await self._kill_all(job)
            with contextlib.suppress(Exception):
                await gathered
            self._finish(job, FAILED, f"exceeded max_run_time of {req.max_run_time} s")
            return
        except asyncio.CancelledError:
            await self._kill_all(job)
            gathered.cancel()
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
        job.stopping = True
        procs = list(job.procs.values())
        for proc in procs:
            local_proc.terminate(proc.pid, contained=job.isolate)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), self.kill_grace)
        except TimeoutError:
            for proc in procs:
                local_proc.kill(proc.pid)
            await asyncio.gather(*(p.wait() for p in procs))
        if job.task is not None and job.task is not asyncio.current_task():
            job.task.cancel()

    def _send_usage(self, events: list, ending: _Job | None = None) -> None:
        """Append accounting events; once they are in, no owed STOP is owed any more.

        ``ending``: the job whose STOP is among ``events`` (its caller saves it).
        Other jobs whose STOP failed earlier went out with these (JobAccounting
        retries them): their rows are saved as sent.
        """
        if ending is not None:
            self._owed[(ending.record.group, ending.record.name)] = ending
        if not self.accounting.send(events):
            return
        for job in self._owed.values():
            job.usage_sent = SENT_STOP
            if job is not ending:
                self._save(job)
        self._owed.clear()

    def _finish(self, job: _Job, state: str, message: str) -> None:
        if job.record.state in FINAL_STATES:
            return
        job.record.state = state
        job.record.message = message
        job.record.queue = {"finished": True}
        job.pids = {}
        if job.usage is not None and self.accounting is not None:
            if job.usage_end is None:
                job.usage_end = self.accounting.now()
            self._send_usage([self.accounting.stop_event(job.usage, job.usage_end)], job)
        # with its end and whether the STOP reached the spool: a restart sends what is owed
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
