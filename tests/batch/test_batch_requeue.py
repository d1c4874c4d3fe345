"""Waiting jobs of the local backend across a restart, in process, with real job processes.

A first backend accepts jobs that all wait (its groups' CPU quota is below one
job's size) and is then dropped without closing, as a killed service would be;
a second one on the same store, started with a changed catalogue and queue
configuration, must queue again what still passes the checks of a new
submission, in priority and submission order, run it, and fail the rest with a
message naming what is gone. Rows without a stored request (earlier versions)
keep the old message, and no job starts before every row is restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from labfleet_batch.local import LocalBackend
from labfleet_batch.local_restore import NOT_STORED
from labfleet_batch.model import QUEUED, RUNNING, JobRecord
from labfleet_batch.queues import parse_queue_config
from labfleet_batch.store import JobStore, process_start_time
from labfleet_batch.validation import Limits, request_fields, validate_request
from labfleet_spawner.catalogue import parse_catalogue

ROOT = Path(__file__).resolve().parents[2]
LIMITS = Limits(min_run_time=1)
USER = "alice"


def catalogue(extra_profile: bool):
    data = yaml.safe_load((ROOT / "config" / "catalogue.yaml").read_text())
    if extra_profile:
        data["profiles"].append(
            {"name": "cpu-extra", "display_name": "CPU (removed later)", "images": ["scipy"],
             "sizes": ["small"]}
        )  # fmt: skip
    return parse_catalogue(data)


def queues(cat, groups: dict):
    return parse_queue_config({"groups": groups}, cat)


def validated(cat, config, user_groups, **fields):
    return validate_request(
        fields,
        catalogue=cat,
        user_groups=user_groups,
        queue_groups=config.covered_accelerators(),
        priorities=config.priorities,
        limits=LIMITS,
    )


@pytest.fixture
def dirs(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o755)
    return str(storage), tmp_path / "state"


def stored_rows(state: Path) -> dict[str, dict]:
    with contextlib.closing(sqlite3.connect(state / "jobs.sqlite")) as conn:
        rows = conn.execute("SELECT grp, name, extra FROM jobs").fetchall()
    return {f"{g}/{n}": json.loads(extra) for g, n, extra in rows}


async def wait_final(backend, record, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = await backend.get(record.group, record.name)
        if current.state not in (QUEUED, RUNNING):
            return current
        await asyncio.sleep(0.1)
    raise AssertionError(f"{record.id} did not finish: {current.to_json()}")


def test_request_fields_validate_back_to_the_same_request():
    cat = catalogue(extra_profile=False)
    config = queues(cat, {"ml": {"cpu": 8, "memory": "8Gi", "accelerators": {"t4": 2}}})
    original = validated(
        cat, config, ["ml", "physics"],
        name="train", script="echo $X", files={"in.txt": "data\n"}, env={"X": "1"},
        accelerator="t4", count=2, completions=3, parallelism=1, priority="high",
    )  # fmt: skip
    fields = json.loads(json.dumps(request_fields(original)))  # it is stored as JSON
    assert validated(cat, config, list(original.user_groups), **fields) == original
    assert original.user_groups == ("ml", "physics")
    # defaults are stored as they were resolved, not left to the next configuration
    assert fields["profile"] == "gpu-t4" and fields["image"] == "pytorch-cuda"
    assert fields["size"] == "small" and fields["max_run_time"] == LIMITS.default_run_time
    command = validated(cat, config, ["ml"], command=["python", "-c", "print(1)"])
    assert validated(cat, config, ["ml"], **request_fields(command)) == command


async def test_waiting_jobs_are_queued_again_checked_against_the_new_configuration(dirs):
    storage, state = dirs
    # -- first lifetime: everything waits (0.5 CPU per group, a job needs 1)
    cat1 = catalogue(extra_profile=True)
    config1 = queues(cat1, {
        "ml": {"cpu": 0.5, "memory": "8Gi", "accelerators": {"t4": 1}},
        "gone": {"cpu": 0.5, "memory": "8Gi"},
    })  # fmt: skip
    first = LocalBackend(config1, storage, store=JobStore(state), isolate=False)
    groups = ["gone", "ml"]

    async def submit(**fields):
        return await first.submit(validated(cat1, config1, groups, **fields), USER)

    low = await submit(name="low", group="ml", priority="low", script="echo low $GREETING",
                       env={"GREETING": "hi"})  # fmt: skip
    extra = await submit(name="extra", group="ml", profile="cpu-extra", script="echo extra")
    in_gone = await submit(name="ingone", group="gone", script="echo gone")
    t4 = await submit(name="t4", group="ml", accelerator="t4", script="echo t4")
    high = await submit(name="high", group="ml", priority="high", command=["cat", "in.txt"],
                        files={"in.txt": "from a file\n"})  # fmt: skip
    normal = await submit(name="normal", group="ml", script="echo normal")
    positions = {r.display_name: (await first.get("ml", r.name)).queue["position"]
                 for r in (high, extra, t4, normal, low)}  # fmt: skip
    assert positions == {"high": 1, "extra": 2, "t4": 3, "normal": 4, "low": 5}
    rows = stored_rows(state)
    assert rows[low.id]["request"]["fields"]["env"] == {"GREETING": "hi"}
    assert rows[low.id]["request"]["user_groups"] == groups
    assert rows[in_gone.id]["request"]["fields"]["group"] == "gone"
    first.store.close()  # dropped without close(): a killed service cancels nothing

    # -- second lifetime: cpu-extra left the catalogue, "gone" the queues, t4 ml's quota
    cat2 = catalogue(extra_profile=False)
    config2 = queues(cat2, {"ml": {"cpu": 8, "memory": "8Gi", "max_running": 1}})
    second = LocalBackend(config2, storage, store=JobStore(state), poll_interval=0.2, isolate=False)
    try:
        assert await second.restore(cat2, LIMITS) == 6
        now = {r.display_name: r for r in await second.list_jobs(["ml", "gone"])}
        assert now["extra"].state == "failed"
        assert "profile 'cpu-extra' is not available to you" in now["extra"].message
        assert now["extra"].message.startswith("the batch service restarted with a changed")
        assert now["ingone"].state == "failed"
        assert "group 'gone' is not one of your groups with a batch queue" in (
            now["ingone"].message
        )
        assert now["t4"].state == "failed"
        assert "group 'ml' has no batch quota for t4" in now["t4"].message
        # the others: priority, then submission order; max_running 1 lets only the first run
        assert now["high"].state == "running"
        assert [now[n].queue["position"] for n in ("normal", "low")] == [1, 2]
        assert now["low"].queue["pending_in_queue"] == 2
        # cancel works on a job queued again
        assert (await second.cancel("ml", normal.name)).state == "cancelled"
        assert (await second.get("ml", low.name)).queue["position"] == 1
        for record in (high, low):
            assert (await wait_final(second, record)).state == "succeeded"
        assert await second.logs("ml", high.name, 0) == "from a file\n"
        assert await second.logs("ml", low.name, 0) == "low hi\n"
        assert not (Path(normal.workdir) / "logs" / "0.log").exists(), "cancelled, never ran"
        # the request (script, files, env) leaves the row once the job is no longer waiting
        assert not any("request" in extra for extra in stored_rows(state).values())
    finally:
        await second.close()
        second.store.close()


async def test_old_rows_keep_the_old_message_and_nothing_starts_before_all_rows_are_restored(
    dirs, tmp_path
):
    storage, state = dirs
    cat = catalogue(extra_profile=False)
    config1 = queues(cat, {"ml": {"cpu": 0.5, "memory": "8Gi"}})
    first = LocalBackend(config1, storage, store=JobStore(state), isolate=False)
    waiting = await first.submit(validated(cat, config1, ["ml"], script="echo waited"), USER)
    # a row as an earlier version wrote it: waiting, no request
    old = JobRecord(name="old-1", group="ml", user=USER, state=QUEUED, workdir=str(tmp_path))
    first.store.save(old, {"demand": {"cpu": 1, "jobs": 1}, "devices": [], "pids": {},
                           "submitted": 2, "deadline": 0})  # fmt: skip
    # then a running job the new service must count before it starts anything: its
    # process is alive, the row comes after the old one whose failure reschedules
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (tmp_path / "logs").mkdir()
        busy = JobRecord(name="busy-1", group="ml", user=USER, state=RUNNING, active=1,
                         workdir=str(tmp_path))  # fmt: skip
        first.store.save(busy, {
            "demand": {"cpu": 1, "jobs": 1}, "devices": [], "submitted": 3, "deadline": 0,
            "pids": {"0": [sleeper.pid, process_start_time(sleeper.pid)]},
        })  # fmt: skip
        first.store.close()

        config2 = queues(cat, {"ml": {"cpu": 8, "memory": "8Gi", "max_running": 1}})
        second = LocalBackend(
            config2, storage, store=JobStore(state), poll_interval=0.2, isolate=False
        )
        try:
            assert await second.restore(cat, LIMITS) == 3
            old_now = await second.get("ml", "old-1")
            assert old_now.state == "failed" and old_now.message == NOT_STORED
            assert (await second.get("ml", "busy-1")).state == "running"
            now = await second.get("ml", waiting.name)
            assert now.state == "queued" and now.queue["position"] == 1, now.to_json()
            assert "insufficient quota for jobs" in now.queue["message"]
            os.killpg(sleeper.pid, signal.SIGKILL)
            sleeper.wait(10)
            assert (await wait_final(second, waiting)).state == "succeeded"
            assert await second.logs("ml", waiting.name, 0) == "waited\n"
            busy_now = await second.get("ml", "busy-1")
            assert busy_now.state == "failed" and "left no exit status" in busy_now.message
        finally:
            await second.close()
            second.store.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait(10)
