"""The local backend's job records survive a restart of the real service process.

The service runs as ``python -m labfleet_batch.service`` (HubAuth against the
session's real hub); it is SIGKILLed while jobs run, and a new process on the
same state directory must list, show and serve logs of the old jobs and
reconcile the running ones: still alive -> running (then finished from its
exit status), gone -> failed, cancel still works; and queue the waiting ones
again, in their order, to run as slots free up with the output they would have
had without the restart.

With device claims shared with the hub: a killed service's running GPU job
keeps its claim, and the next backend drops only the batch claims it did not
restore, never the hub's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from labfleet_batch.local import LocalBackend
from labfleet_batch.queues import parse_queue_config
from labfleet_batch.store import JobStore
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.devices import DeviceAllocator
from labfleet_spawner.nvml import GpuDevice

from tests.batch.harness import wait_processes_gone
from tests.batch.hub import BATCH_SCOPE, Hub
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


class Service:
    def __init__(self, hub: Hub, workdir: Path):
        self.hub, self.workdir = hub, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/services/batch/"
        self.proc = None

    def start(self):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")},
            "JUPYTERHUB_API_TOKEN": self.hub.batch_token,
            "JUPYTERHUB_API_URL": self.hub.url,
            "JUPYTERHUB_SERVICE_NAME": "batch",
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{self.port}",
            "JUPYTERHUB_SERVICE_PREFIX": "/services/batch/",
            "JUPYTERHUB_OAUTH_ACCESS_SCOPES": json.dumps([BATCH_SCOPE]),
        }
        log = open(self.workdir / "service.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "labfleet_batch.service",
             "--config", str(self.workdir / "batch_config.py")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(300):
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "service.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(self.url + "health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("batch service did not start")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def call(self, method, path, token, body=None):
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode()
                status = resp.status
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def wait_state(self, job_id, token, states, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.call("GET", f"api/jobs/{job_id}", token)
            if status == 200 and body["state"] in states:
                return body
            time.sleep(0.2)
        raise AssertionError(f"{job_id} not in {states}: {body}")


@pytest.fixture
def service(hub, tmp_path):
    storage = Path(tmp_path / "storage")
    storage.mkdir(mode=0o755)
    group = f"rs{os.urandom(3).hex()}"
    (tmp_path / "queues.yaml").write_text(
        yaml.safe_dump({"groups": {group: {"cpu": 8, "memory": "8Gi", "max_running": 3}}})
    )
    (tmp_path / "batch_config.py").write_text(
        "c = get_config()  # noqa\n"
        "c.BatchService.backend = 'local'\n"
        f"c.BatchService.catalogue_path = {str(ROOT / 'config' / 'catalogue.yaml')!r}\n"
        f"c.BatchService.queues_path = {str(tmp_path / 'queues.yaml')!r}\n"
        f"c.BatchService.storage_root = {str(storage)!r}\n"
        f"c.BatchService.state_dir = {str(tmp_path / 'state')!r}\n"
        "c.BatchService.limits = {'min_run_time': 1}\n"
        # jobs as the test's own user, without hub ids: said explicitly (as root, too)
        "c.BatchService.isolate_users = 'no'\n"
        "c.BatchService.allow_root_jobs = True\n"
    )
    svc = Service(hub, tmp_path)
    svc.group = group
    svc.start()
    yield svc
    if svc.proc.poll() is None:
        svc.kill()


GATED = "until [ -e go ]; do sleep 0.1; done; echo {}"  # runs until the test creates ./go


def test_records_survive_a_killed_service_and_running_jobs_are_reconciled(service, hub):
    group = service.group
    token = hub.add_user(f"restart{os.urandom(3).hex()}", [group])

    def submit(name, script=None, **kw):
        body = {"name": name, "group": group, **kw}
        if script is not None:
            body["script"] = script
        status, body = service.call("POST", "api/jobs", token, body)
        assert status == 201, body
        return body["id"]

    def get(job):
        status, body = service.call("GET", f"api/jobs/{job}", token)
        assert status == 200, body
        return body

    def open_gate(job):
        (Path(get(job)["workdir"]) / "go").touch()

    done = submit("done", "echo first")
    service.wait_state(done, token, {"succeeded"})
    failed = submit("failed", "echo bad; exit 3")
    service.wait_state(failed, token, {"failed"})
    later = submit("later", GATED.format("later"))
    lost = submit("lost", "echo $$ > main.pid; sleep 60")
    cancel = submit("cancel", "echo $$ > main.pid; sleep 60")
    for job in (later, lost, cancel):
        service.wait_state(job, token, {"running"})
    # max_running 3: these wait, high priority first, then in submission order
    inputs = submit(
        "inputs", 'echo "$GREETING $JOB_COMPLETION_INDEX"; cat in.txt',
        files={"in.txt": "from a file\n"}, env={"GREETING": "hello"}, completions=2,
    )  # fmt: skip
    second = submit("second", command=["echo", "second"])
    high = submit("high", GATED.format("high"), priority="high")
    dropped = submit("dropped", "echo never", priority="low")
    waiting = (high, inputs, second, dropped)
    before = [get(job)["queue"] for job in waiting]
    assert [q["position"] for q in before] == [1, 2, 3, 4], before
    _, lost_job = service.call("GET", f"api/jobs/{lost}", token)
    pid_file = Path(lost_job["workdir"]) / "main.pid"
    for _ in range(50):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.1)

    service.kill()
    # while the service is down, one job's whole process group is killed: no exit status
    os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
    service.start()

    status, body = service.call("GET", "api/jobs", token)
    assert status == 200
    states = {j["id"]: j["state"] for j in body["jobs"]}
    assert set(states) == {done, failed, later, lost, cancel, *waiting}
    assert states[done] == "succeeded" and states[failed] == "failed"
    assert states[later] == "running" and states[cancel] == "running"
    # lost's slot went to the first waiting job; the others wait in their old order
    assert states[lost] == "failed" and "left no exit status" in get(lost)["message"]
    assert states[high] == "running"
    after = {job: get(job) for job in (inputs, second, dropped)}
    assert all(j["state"] == "queued" for j in after.values()), after
    assert [j["queue"]["position"] for j in after.values()] == [1, 2, 3], after
    assert after[dropped]["queue"]["pending_in_queue"] == 3
    # logs of old jobs are still served
    assert service.call("GET", f"api/jobs/{done}/logs?index=0", token)[1] == "first\n"
    assert service.call("GET", f"api/jobs/{failed}/logs?index=0", token)[1] == "bad\n"
    # a job queued again can be cancelled while it waits
    status, body = service.call("DELETE", f"api/jobs/{dropped}", token)
    assert status == 200 and body["state"] == "cancelled"
    assert [get(job)["queue"]["position"] for job in (inputs, second)] == [1, 2]
    # a job still running is watched to its end and finished by its exit status ...
    open_gate(later)
    finished = service.wait_state(later, token, {"succeeded", "failed"}, timeout=20)
    assert finished["state"] == "succeeded", finished
    assert service.call("GET", f"api/jobs/{later}/logs?index=0", token)[1] == "later\n"
    # ... and its slot runs the waiting jobs, one after the other, as without a restart
    for job in (inputs, second):
        assert service.wait_state(job, token, {"succeeded", "failed"})["state"] == "succeeded"
    logs = [service.call("GET", f"api/jobs/{inputs}/logs?index={i}", token)[1] for i in (0, 1)]
    assert logs == ["hello 0\nfrom a file\n", "hello 1\nfrom a file\n"]
    assert service.call("GET", f"api/jobs/{second}/logs?index=0", token)[1] == "second\n"
    open_gate(high)
    assert service.wait_state(high, token, {"succeeded", "failed"})["state"] == "succeeded"
    assert service.call("GET", f"api/jobs/{high}/logs?index=0", token)[1] == "high\n"
    assert service.call("GET", f"api/jobs/{dropped}/logs?index=0", token)[0] == 409
    # cancelling a job the previous service started kills its process group
    status, body = service.call("DELETE", f"api/jobs/{cancel}", token)
    assert status == 200 and body["state"] == "cancelled"
    cancelled_pid = int((Path(body["workdir"]) / "main.pid").read_text())
    assert wait_processes_gone([cancelled_pid]) == []
    # another user still sees none of it after the restart
    other = hub.add_user(f"other{os.urandom(3).hex()}", [f"x{group}"])
    assert service.call("GET", f"api/jobs/{done}", other)[0] == 404
    assert (service.workdir / "state" / "jobs.sqlite").stat().st_mode & 0o777 == 0o600
    assert (service.workdir / "state").stat().st_mode & 0o777 == 0o700
    # the scripts, files and env of the waiting jobs left the store once they were not waiting
    with contextlib.closing(sqlite3.connect(service.workdir / "state" / "jobs.sqlite")) as db:
        assert [r for r in db.execute("SELECT extra FROM jobs") if '"request"' in r[0]] == []
    # nothing of them in the service's log either
    assert "from a file" not in (service.workdir / "service.log").read_text()


# -- device claims shared with the hub across a restart ------------------------------------

#: A first batch service, in a process of its own: one GPU job running, and a claim it
#: made but never recorded (killed between the two). Prints the job once it runs.
FIRST_SERVICE = """
import asyncio, json, sys
from pathlib import Path
from labfleet_batch.local import LocalBackend
from labfleet_batch.store import JobStore
from labfleet_batch.validation import validate_request
from tests.batch.test_batch_restart import claims_queue_config, t4_devices

async def main(storage, state, claims):
    catalogue, config = claims_queue_config()
    backend = LocalBackend(config, storage, allocator=t4_devices(), store=JobStore(state),
                           device_claims_path=claims, isolate=False)
    request = validate_request(
        {"name": "keep", "script": "echo $$ > main.pid; sleep 60", "accelerator": "t4"},
        catalogue=catalogue, user_groups=["ml"], queue_groups=config.covered_accelerators(),
        priorities=config.priorities,
    )
    record = await backend.submit(request, "alice")
    backend.allocator.allocate("batch:ml/ghost", request.selection.accelerator)
    pid_file = Path(record.workdir) / "main.pid"
    for _ in range(200):  # until the job runs and has said who it is (at most 10 s)
        if record.active and pid_file.exists() and pid_file.read_text().strip():
            print(json.dumps(record.to_json()), flush=True)
            break
        await asyncio.sleep(0.05)
    else:
        sys.exit(f"the job did not start: {record.to_json()}")
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


def claims_queue_config():
    catalogue = load_catalogue(ROOT / "config" / "catalogue.yaml")
    groups = {"ml": {"cpu": 8, "memory": "8Gi", "accelerators": {"t4": 3}}}
    return catalogue, parse_queue_config({"groups": groups}, catalogue)


def t4_devices(component: str = "", claims=None):
    devices = [GpuDevice(i, f"GPU-t4-{i}", "Tesla T4") for i in range(3)]
    return DeviceAllocator(devices, claims_path=claims, component=component)


async def test_restarted_backend_keeps_its_jobs_claims_and_drops_only_its_stale_ones(
    tmp_path, caplog
):
    storage, state, claims = tmp_path / "storage", tmp_path / "state", tmp_path / "claims.json"
    storage.mkdir(mode=0o755)
    catalogue, config = claims_queue_config()
    t4 = catalogue.accelerators["t4"]
    hub = t4_devices("notebooks", claims)  # the hub's allocator: alice's notebook has GPU-t4-0
    assert [d.uuid for d in hub.allocate("alice/", t4)] == ["GPU-t4-0"]

    first = subprocess.Popen(
        [sys.executable, "-c", FIRST_SERVICE, str(storage), str(state), str(claims)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    job_pid = None
    try:
        line = first.stdout.readline()
        if not line.startswith("{"):
            pytest.fail(f"the first service failed: {line}{first.stdout.read()}")
        job = json.loads(line)
        job_pid = int((Path(job["workdir"]) / "main.pid").read_text())
        first.kill()  # no chance to release anything
        first.wait(10)
        assert hub.owner_of("GPU-t4-1") == f"batch:{job['id']}"
        assert hub.owner_of("GPU-t4-2") == "batch:ml/ghost"
        assert hub.free_and_total(t4) == (0, 3), "claims outlive the batch service"

        backend = LocalBackend(
            config, str(storage), allocator=t4_devices(), store=JobStore(state),
            device_claims_path=str(claims), poll_interval=0.2, isolate=False,
        )  # fmt: skip
        assert await backend.restore() == 1
        restored = await backend.get("ml", job["name"])
        assert restored.state == "running" and restored.active == 1
        assert hub.owner_of("GPU-t4-1") == f"batch:{job['id']}", "its running job keeps it"
        assert hub.owner_of("GPU-t4-2") is None, "the unrecorded claim is dropped"
        assert hub.owner_of("GPU-t4-0") == "alice/", "the hub's claim is not the batch's to drop"
        dropped = [r.getMessage() for r in caplog.records if "stale device claim" in r.getMessage()]
        assert dropped == [
            "Dropped stale device claim: GPU-t4-2 was held by batch:ml/ghost, "
            "which the batch service no longer runs"
        ]
        cancelled = await backend.cancel("ml", job["name"])
        assert cancelled.state == "cancelled"
        assert hub.owner_of("GPU-t4-1") is None and hub.free_and_total(t4) == (2, 3)
        await backend.close()
    finally:
        if first.poll() is None:
            first.kill()
        if job_pid is not None:  # whatever failed, the job's sleep does not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(job_pid), signal.SIGKILL)
