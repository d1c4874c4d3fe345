"""Issue 9, item 4: local batch jobs reach the accounting ledger, reports and budgets, once.

The batch service runs for real (``python -m labfleet_batch.service``, HubAuth
against the session's hub) with ``accounting_spool``; the ledger is fed by the
accounting service's own ingest (``SpoolCollector`` on SQLite), as in
``labfleet up``. Jobs succeed, fail, run out of time and are cancelled (one
while it waits, which used nothing); the service is SIGKILLed with jobs
running and waiting, one of them ends while it is down, and the restarted
service concludes, follows and starts the rest. Every job that started is one
``batch`` interval with its user, group, profile, resources and duration; the
whole spool ingested again changes nothing.

In process: a GPU job's device time reaches the report's GPU-hours and the
group's budget; a spool that cannot be written loses nothing (caught up by the
next append, and by a restarted backend from its store).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from labfleet_accounting import db
from labfleet_accounting.budgets import BudgetChecker
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.reports import query_usage, summarize
from labfleet_accounting.spool import SpoolCollector
from labfleet_batch.local import LocalBackend
from labfleet_batch.local_accounting import SOURCE, JobAccounting
from labfleet_batch.queues import parse_queue_config
from labfleet_batch.store import JobStore
from labfleet_batch.validation import Limits, validate_request
from labfleet_spawner.catalogue import load_catalogue, parse_quantity
from labfleet_spawner.devices import DeviceAllocator
from labfleet_spawner.nvml import GpuDevice

from tests.batch.test_batch_restart import ROOT, Service

GATED = "until [ -e go ]; do sleep 0.1; done; echo {}"  # runs until the test creates ./go
GIB2 = parse_quantity("2Gi")


def ledger_for(path: Path) -> Ledger:
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    return Ledger(engine)


def batch_rows(ledger: Ledger) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in ledger.intervals(SOURCE):
        rows.setdefault(row["uid"], []).append(row)
    return rows


@pytest.fixture
def accounted_service(hub, tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o755)
    suffix = os.urandom(3).hex()
    groups = {"main": f"ac{suffix}", "one": f"ao{suffix}"}
    queues = {
        "groups": {
            groups["main"]: {"cpu": 8, "memory": "16Gi", "max_running": 4},
            groups["one"]: {"cpu": 8, "memory": "16Gi", "max_running": 1},
        }
    }
    (tmp_path / "queues.yaml").write_text(yaml.safe_dump(queues))
    spool = tmp_path / "hubstate" / "accounting.spool"
    (tmp_path / "batch_config.py").write_text(
        "c = get_config()  # noqa\n"
        "c.BatchService.backend = 'local'\n"
        f"c.BatchService.catalogue_path = {str(ROOT / 'config' / 'catalogue.yaml')!r}\n"
        f"c.BatchService.queues_path = {str(tmp_path / 'queues.yaml')!r}\n"
        f"c.BatchService.storage_root = {str(storage)!r}\n"
        f"c.BatchService.state_dir = {str(tmp_path / 'state')!r}\n"
        f"c.BatchService.accounting_spool = {str(spool)!r}\n"
        "c.BatchService.limits = {'min_run_time': 1}\n"
        # jobs as the test's own user, without hub ids: said explicitly (as root, too)
        "c.BatchService.isolate_users = 'no'\n"
        "c.BatchService.allow_root_jobs = True\n"
    )
    svc = Service(hub, tmp_path)
    svc.groups, svc.spool = groups, spool
    svc.start()
    yield svc
    if svc.proc.poll() is None:
        svc.kill()


def test_every_started_local_job_is_one_batch_interval_across_a_restart(
    accounted_service, hub, tmp_path
):
    service, groups = accounted_service, accounted_service.groups
    user = f"acct{os.urandom(3).hex()}"
    token = hub.add_user(user, list(groups.values()))
    ledger = ledger_for(tmp_path / "ledger.sqlite")
    collector = SpoolCollector(ledger, path=str(service.spool))

    def submit(name, script, group="main", **kw):
        body = {"name": name, "group": groups[group], "size": "small", "script": script, **kw}
        status, body = service.call("POST", "api/jobs", token, body)
        assert status == 201, body
        return body["id"]

    def get(job):
        status, body = service.call("GET", f"api/jobs/{job}", token)
        assert status == 200, body
        return body

    def open_gate(job):
        (Path(get(job)["workdir"]) / "go").touch()

    t0 = int(time.time())
    ok = submit("ok", "sleep 2; echo ok", completions=2, parallelism=2)
    bad = submit("bad", "sleep 1; exit 3")
    slow = submit("slow", "sleep 60", max_run_time=2)
    cancel = submit("cancel", "sleep 60")
    hold = submit("hold", GATED.format("hold"), group="one")
    never = submit("never", "echo never", group="one")  # waits behind hold (max_running 1)
    service.wait_state(cancel, token, {"running"})
    service.wait_state(hold, token, {"running"})
    assert get(never)["state"] == "queued"
    time.sleep(1.5)
    assert service.call("DELETE", f"api/jobs/{cancel}", token)[0] == 200
    assert service.call("DELETE", f"api/jobs/{never}", token)[0] == 200
    assert service.wait_state(ok, token, {"succeeded", "failed"})["state"] == "succeeded"
    assert service.wait_state(bad, token, {"succeeded", "failed"})["state"] == "failed"
    timed_out = service.wait_state(slow, token, {"succeeded", "failed"})
    assert "max_run_time" in timed_out["message"], timed_out

    # the accounting service ingests while the batch service runs
    collector.ingest_available()
    rows = batch_rows(ledger)
    assert set(rows) == {ok, bad, slow, cancel, hold}, "a job that never started is not counted"
    assert rows[hold][0]["end_s"] is None, "a running job is an open interval"

    # jobs running and waiting when the service is killed
    down = submit("down", GATED.format("down"))  # ends while the service is down
    across = submit("across", GATED.format("across"))  # still runs after the restart
    waits = submit("waits", "sleep 1; echo waits", group="one")  # behind hold
    service.wait_state(down, token, {"running"})
    service.wait_state(across, token, {"running"})
    assert get(waits)["state"] == "queued"
    down_dir = Path(get(down)["workdir"])
    service.kill()
    (down_dir / "go").touch()
    gate_opened = time.time()
    for _ in range(100):  # until its exit status is written
        if (down_dir / "logs" / "0.exit").exists():
            break
        time.sleep(0.05)
    time.sleep(3)  # and a while longer: its end must not be the restart
    restarted = time.time()
    service.start()

    assert service.wait_state(down, token, {"succeeded", "failed"})["state"] == "succeeded"
    assert get(across)["state"] == "running"
    open_gate(across)
    open_gate(hold)
    for job in (across, hold, waits):
        assert service.wait_state(job, token, {"succeeded", "failed"})["state"] == "succeeded"
    collector.ingest_available()

    rows = batch_rows(ledger)
    started = {ok, bad, slow, cancel, hold, down, across, waits}
    assert set(rows) == started
    assert all(len(r) == 1 for r in rows.values()), {k: len(r) for k, r in rows.items()}
    one = {job: r[0] for job, r in rows.items()}
    for job, row in one.items():
        status = get(job)
        assert row["end_s"] is not None, f"{job} left open"
        assert (row["kind"], row["user_name"], row["group_name"]) == (
            "batch",
            user,
            status["group"],
        )
        assert row["profile"] == status["profile"] and row["name"] == status["name"]
        assert (row["accelerator"], row["accelerator_count"]) == ("", 0)
        par = status["parallelism"]
        assert (row["cpu"], row["memory"]) == (1.0 * par, GIB2 * par), row
        assert t0 <= row["start_s"] <= row["end_s"] <= time.time() + 1
    seconds = {job: row["end_s"] - row["start_s"] for job, row in one.items()}
    assert 2 <= seconds[ok] <= 5, seconds
    assert 1 <= seconds[bad] <= 4, seconds
    assert 2 <= seconds[slow] <= 5, seconds  # killed at its max_run_time
    assert 1 <= seconds[cancel] <= 5, seconds
    assert seconds[hold] >= 4, seconds  # ran across the restart
    # ended while the service was down: at its exit status, not at the restart
    assert one[down]["end_s"] <= int(gate_opened) + 2 < int(restarted), (one[down], gate_opened)
    assert one[across]["end_s"] >= int(restarted), one[across]

    # the report: all of it batch use, the CPU-hours those of the intervals
    summary = summarize(query_usage(ledger.engine, t0 - 60, int(time.time()) + 60), "user")
    assert set(summary[user]) == {"batch", "total"}
    assert summary[user]["batch"]["intervals"] == len(started)
    cpu_hours = sum(row["cpu"] * seconds[job] for job, row in one.items()) / 3600
    assert summary[user]["batch"]["cpu_core_hours"] == pytest.approx(cpu_hours, abs=1e-5)

    # the restarted service announced its running jobs again: absorbed by the ledger
    lines = [json.loads(line) for line in service.spool.read_text().splitlines()]
    starts = [e for e in lines if e["type"] == "start" and e["usage"]["uid"] == across]
    assert len(starts) == 2
    # and the whole spool ingested once more (a lost checkpoint) changes nothing
    before = ledger.intervals(SOURCE)
    ledger.save_checkpoint(collector.source_name, "0")
    assert collector.ingest_available() == len(lines)
    assert ledger.intervals(SOURCE) == before


# -- in process ---------------------------------------------------------------------------


def gpu_backend(tmp_path, accounting, store=None):
    catalogue = load_catalogue(ROOT / "config" / "catalogue.yaml")
    config = parse_queue_config(
        {"groups": {"ml": {"cpu": 8, "memory": "16Gi", "accelerators": {"t4": 2}}}}, catalogue
    )
    devices = [GpuDevice(i, f"GPU-t4-{i}", "Tesla T4") for i in range(2)]
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o755, exist_ok=True)
    backend = LocalBackend(
        config,
        str(storage),
        allocator=DeviceAllocator(devices),
        isolate=False,
        kill_grace=1,
        store=store,
        accounting=accounting,
    )
    return backend, catalogue, config


def request(catalogue, config, script, **fields):
    return validate_request(
        {"script": script, "group": "ml", **fields},
        catalogue=catalogue,
        user_groups=["ml"],
        queue_groups=config.covered_accelerators(),
        priorities=config.priorities,
        limits=Limits(min_run_time=1),
    )


async def wait_final(backend, record, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = await backend.get(record.group, record.name)
        if current.state in ("succeeded", "failed", "cancelled"):
            return current
        await asyncio.sleep(0.05)
    raise AssertionError(f"{record.id} did not end: {record.to_json()}")


async def test_gpu_job_time_reaches_gpu_hours_and_the_group_budget(tmp_path):
    spool = tmp_path / "accounting.spool"
    backend, catalogue, config = gpu_backend(tmp_path, JobAccounting(str(spool)))
    try:
        record = await backend.submit(
            request(catalogue, config, "sleep 2", accelerator="t4", parallelism=2, completions=2),
            "alice",
        )
        assert (await wait_final(backend, record)).state == "succeeded"
    finally:
        await backend.close()
    ledger = ledger_for(tmp_path / "ledger.sqlite")
    SpoolCollector(ledger, path=str(spool)).ingest_available()
    [row] = ledger.intervals(SOURCE)
    assert (row["uid"], row["kind"], row["user_name"], row["group_name"]) == (
        record.id, "batch", "alice", "ml",
    )  # fmt: skip
    # two completions at once, one T4 each: two devices held from start to end
    assert (row["accelerator"], row["accelerator_kind"], row["accelerator_count"]) == (
        "t4", "gpu", 2,
    )  # fmt: skip
    seconds = row["end_s"] - row["start_s"]
    assert 2 <= seconds <= 5
    now = int(time.time())
    summary = summarize(query_usage(ledger.engine, now - 3600, now + 60), "group")
    expected = pytest.approx(2 * seconds / 3600, abs=1e-5)  # the report rounds to 6 digits
    assert summary["ml"]["batch"]["gpu_hours"] == {"t4": expected}
    budgets = BudgetChecker(ledger.engine)
    budgets.set_budget("ml", gpu_hours=0.0001)
    decision = budgets.check_budget("ml", "gpu")
    assert not decision.allowed, decision.as_dict()


async def test_an_unwritable_spool_loses_no_record(tmp_path):
    spool = tmp_path / "accounting.spool"
    spool.mkdir()  # a folder where the spool should be: every append fails (even as root)
    store = JobStore(tmp_path / "state")
    backend, catalogue, config = gpu_backend(tmp_path, JobAccounting(str(spool)), store)
    first = await backend.submit(request(catalogue, config, "true"), "alice")
    assert (await wait_final(backend, first)).state == "succeeded"
    # the spool comes back: the next event brings the missed ones with it
    spool.rmdir()
    second = await backend.submit(request(catalogue, config, "sleep 1"), "bob")
    assert (await wait_final(backend, second)).state == "succeeded"
    ledger = ledger_for(tmp_path / "ledger.sqlite")
    collector = SpoolCollector(ledger, path=str(spool))
    collector.ingest_available()
    assert set(batch_rows(ledger)) == {first.id, second.id}

    sent = len(spool.read_text().splitlines())
    assert sent == 4  # start and stop of each

    # down again while a job runs and ends, and the service stops before it comes back
    spool.rename(tmp_path / "spool.aside")
    spool.mkdir()
    third = await backend.submit(request(catalogue, config, "true"), "carol")
    assert (await wait_final(backend, third)).state == "succeeded"
    await backend.close()
    spool.rmdir()
    (tmp_path / "spool.aside").rename(spool)
    restarted, _, _ = gpu_backend(tmp_path, JobAccounting(str(spool)), JobStore(tmp_path / "state"))
    assert await restarted.restore(catalogue) == 3
    await restarted.close()
    # only what was owed is sent again: the third job's stop (with its whole usage)
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [(e["type"], e["usage"]["uid"]) for e in lines[sent:]] == [("stop", third.id)]
    collector.ingest_available()
    rows = batch_rows(ledger)
    assert set(rows) == {first.id, second.id, third.id}
    assert all(len(r) == 1 and r[0]["end_s"] is not None for r in rows.values())
    # and a third lifetime owes nothing
    again, _, _ = gpu_backend(tmp_path, JobAccounting(str(spool)), JobStore(tmp_path / "state"))
    await again.restore(catalogue)
    await again.close()
    assert len(spool.read_text().splitlines()) == len(lines)
