"""The local backend's job records survive a restart of the real service process.

The service runs as ``python -m labfleet_batch.service`` (HubAuth against the
session's real hub); it is SIGKILLed while jobs run, and a new process on the
same state directory must list, show and serve logs of the old jobs and
reconcile the running ones: still alive -> running (then finished from its
exit status), gone -> failed, never started -> failed, cancel still works.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

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
    )
    svc = Service(hub, tmp_path)
    svc.group = group
    svc.start()
    yield svc
    if svc.proc.poll() is None:
        svc.kill()


def test_records_survive_a_killed_service_and_running_jobs_are_reconciled(service, hub):
    group = service.group
    token = hub.add_user(f"restart{os.urandom(3).hex()}", [group])

    def submit(name, script, **kw):
        body = {"name": name, "script": script, "group": group, **kw}
        status, body = service.call("POST", "api/jobs", token, body)
        assert status == 201, body
        return body["id"]

    done = submit("done", "echo first")
    service.wait_state(done, token, {"succeeded"})
    failed = submit("failed", "echo bad; exit 3")
    service.wait_state(failed, token, {"failed"})
    later = submit("later", "sleep 3; echo later")
    lost = submit("lost", "echo $$ > main.pid; sleep 60")
    cancel = submit("cancel", "echo $$ > main.pid; sleep 60")
    for job in (later, lost, cancel):
        service.wait_state(job, token, {"running"})
    queued = submit("queued", "echo never")  # max_running 3: waits
    assert service.call("GET", f"api/jobs/{queued}", token)[1]["state"] == "queued"
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
    assert set(states) == {done, failed, later, lost, cancel, queued}
    assert states[done] == "succeeded" and states[failed] == "failed"
    assert states[later] == "running" and states[cancel] == "running"
    # logs of old jobs are still served
    assert service.call("GET", f"api/jobs/{done}/logs?index=0", token)[1] == "first\n"
    assert service.call("GET", f"api/jobs/{failed}/logs?index=0", token)[1] == "bad\n"
    gone = service.wait_state(lost, token, {"failed"})
    assert "left no exit status" in gone["message"]
    never = service.wait_state(queued, token, {"failed"})
    assert "restarted before this job started" in never["message"]
    # a job still running is watched to its end and finished by its exit status
    finished = service.wait_state(later, token, {"succeeded", "failed"}, timeout=20)
    assert finished["state"] == "succeeded", finished
    assert service.call("GET", f"api/jobs/{later}/logs?index=0", token)[1] == "later\n"
    # cancelling a job the previous service started kills its process group
    status, body = service.call("DELETE", f"api/jobs/{cancel}", token)
    assert status == 200 and body["state"] == "cancelled"
    cancelled_pid = int((Path(body["workdir"]) / "main.pid").read_text())
    time.sleep(0.3)
    stat = Path(f"/proc/{cancelled_pid}/stat")
    assert not stat.exists() or ") Z " in stat.read_text()
    # another user still sees none of it after the restart
    other = hub.add_user(f"other{os.urandom(3).hex()}", [f"x{group}"])
    assert service.call("GET", f"api/jobs/{done}", other)[0] == 404
    assert (service.workdir / "state" / "jobs.sqlite").stat().st_mode & 0o777 == 0o600
