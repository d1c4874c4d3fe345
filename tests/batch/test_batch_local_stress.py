"""Issue 17: a local job is only handed to the scheduler once everything it needs exists.

Jobs are submitted in tight loops (one after another, and many at once) while
earlier jobs finish, so that a finishing job's scheduling pass runs while a
new submission is still writing its folder. Every accepted job must either run
its command (succeeded, logs with its output) or fail for a reason that is the
user's (its command exited non-zero); never for a file of the platform's own
(``logs/<index>.log``, ``.labfleet-job.sh``, the job's folder) that did not
exist yet.

The first test drives :class:`LocalBackend` directly (several hundred
submissions); the second sends a smaller burst through the real service (HTTP,
HubAuth against the session's hub).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from labfleet_batch.local import LocalBackend
from labfleet_batch.queues import parse_queue_config
from labfleet_batch.validation import Limits, validate_request
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.devices import DeviceAllocator

from tests.batch.harness import make_context, running_service

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
FINAL = {"succeeded", "failed", "cancelled"}
#: What a failure of the platform's own says (never the user's command)
PLATFORM_FAILURES = ("could not start", "cannot start", "No such file", "left no exit status")


@pytest.fixture
def storage_root():
    root = Path(tempfile.mkdtemp(prefix="labfleet-stress-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def job_body(rng: random.Random, group: str, i: int) -> tuple[dict, bool]:
    """A random trivial job and whether its command succeeds."""
    completions = rng.choice([1, 1, 1, 2, 3])
    parallelism = rng.randint(1, completions)
    fails = rng.random() < 0.25
    body: dict = {
        "name": f"s{i}",
        "group": group,
        "size": "small",
        "completions": completions,
        "parallelism": parallelism,
        "max_run_time": 60,
    }
    shape = rng.randrange(4)
    if shape == 0:
        body["command"] = ["/bin/sh", "-c", "exit 3"] if fails else ["echo", f"out-{i}"]
    elif shape == 1:
        body["script"] = f"echo out-{i}\n" + ("exit 3\n" if fails else "")
    elif shape == 2:  # a script with a shebang is run directly (chmod, exec of the file)
        body["script"] = f"#!/bin/sh\necho out-{i}\n" + ("exit 3\n" if fails else "")
    else:
        body["files"] = {"in.txt": f"out-{i}\n"}
        body["script"] = "cat in.txt\n" + ("exit 3\n" if fails else "")
    return body, not fails


def check_outcome(record, workdir: Path, i: int, succeeds: bool) -> str | None:
    """None when the job ended as its command says; else what is wrong."""
    if record.state not in FINAL:
        return f"s{i} ({record.id}) still {record.state}: {record.queue}"
    if succeeds:
        if record.state != "succeeded":
            return f"s{i} ({record.id}) {record.state}: {record.message!r}"
        for index in range(record.completions):
            log = workdir / "logs" / f"{index}.log"
            if not log.exists() or log.read_text() != f"out-{i}\n":
                text = log.read_text() if log.exists() else "(no log)"
                return f"s{i} ({record.id}) completion {index} log: {text!r}"
        return None
    # the user's own failure: every completion ran its command and exited 3
    if record.state != "failed" or any(word in record.message for word in PLATFORM_FAILURES):
        return f"s{i} ({record.id}) {record.state}: {record.message!r}"
    for index in range(record.completions):
        status = workdir / "logs" / f"{index}.exit"
        if not status.exists() or status.read_text().strip() != "3":
            return f"s{i} ({record.id}) completion {index} did not run its command"
    return None


async def wait_all_final(get, ids, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [(await get(job)).state for job in ids]
        if all(s in FINAL for s in states):
            return
        await asyncio.sleep(0.1)


async def assert_outcomes(backend, group: str, submitted: list[tuple[int, str, bool]]) -> None:
    """Every accepted job ran its command or failed for its own reason, never the platform's."""

    async def get(name):
        return await backend.get(group, name)

    await wait_all_final(get, [name for _, name, _ in submitted], timeout=120)
    problems = []
    for n, name, succeeds in sorted(submitted):
        record = await backend.get(group, name)
        problem = check_outcome(record, Path(record.workdir), n, succeeds)
        if problem:
            problems.append(problem)
    assert not problems, f"{len(problems)} of {len(submitted)} jobs: " + "\n".join(problems[:10])


async def test_rapid_submissions_while_jobs_finish_never_start_a_job_before_its_files(
    storage_root,
):
    rng = random.Random(17)
    group = "stress"
    config = parse_queue_config(
        # small jobs, several at once: finishes (and their scheduling passes) all the time
        {"groups": {group: {"cpu": 64, "memory": "256Gi", "max_running": 6}}},
        CATALOGUE,
    )
    backend = LocalBackend(
        config, str(storage_root), allocator=DeviceAllocator([]), isolate=False, kill_grace=1
    )
    limits = Limits(min_run_time=1)
    submitted: list[tuple[int, str, bool]] = []  # (i, name, succeeds)

    async def submit(i: int):
        body, succeeds = job_body(rng, group, i)
        request = validate_request(
            body,
            catalogue=CATALOGUE,
            user_groups=[group],
            queue_groups=config.covered_accelerators(),
            priorities=config.priorities,
            limits=limits,
        )
        record = await backend.submit(request, "stressuser")
        submitted.append((i, record.name, succeeds))

    started = time.monotonic()
    i = 0
    try:
        for wave in range(50):
            if wave % 2:
                # one after another, as fast as the backend answers
                for _ in range(8):
                    await submit(i)
                    i += 1
            else:
                # a burst at once
                await asyncio.gather(*(submit(i + k) for k in range(8)))
                i += 8
            # let some of the earlier jobs finish while the next wave arrives
            await asyncio.sleep(rng.choice([0, 0, 0.005, 0.02]))
        assert len(submitted) == 400

        await assert_outcomes(backend, group, submitted)
    finally:
        await backend.close()
    print(f"{len(submitted)} jobs in {time.monotonic() - started:.1f} s")


async def test_rapid_submissions_through_the_service(hub, storage_root):
    """A smaller burst through the real HTTP service (hub tokens, mapped uids when root)."""
    from labfleet_hub.posix_ids import hub_api_ids

    rng = random.Random(1717)
    group = f"st{uuid.uuid4().hex[:6]}"
    config = parse_queue_config(
        {"groups": {group: {"cpu": 64, "memory": "256Gi", "max_running": 4}}}, CATALOGUE
    )
    backend = LocalBackend(
        config,
        str(storage_root),
        allocator=DeviceAllocator([]),
        hub_ids=hub_api_ids(hub.url, hub.batch_token),
        kill_grace=1,
    )
    token = hub.add_user(f"stress{uuid.uuid4().hex[:6]}", [group])
    ctx = make_context(backend, CATALOGUE, config, hub, limits=Limits(min_run_time=1))
    submitted: list[tuple[int, str, bool]] = []
    try:
        async with running_service(ctx) as service:

            async def submit(i: int):
                body, succeeds = job_body(rng, group, i)
                r = await service.call("POST", "api/jobs", token, body)
                assert r.status == 201, r.text
                submitted.append((i, r.body["name"], succeeds))

            # bursts of 6: the test's requests and the service's own calls to the hub share
            # this event loop's AsyncHTTPClient (10 connections at most)
            for wave in range(10):
                await asyncio.gather(*(submit(wave * 6 + k) for k in range(6)))

            await assert_outcomes(backend, group, submitted)
    finally:
        await backend.close()
