"""A hostile user against the root batch service (issue 10, the critical part).

Each test does what a user with a notebook can do (a job's own script, or
their own home, changed under the service's feet) and checks that the
service, running as root, never reads, writes or hands over a file that is
not the user's, and that nothing a job starts outlives it.
"""

# ruff: noqa: F811  (the fixtures come from test_batch_local_api)
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.batch.harness import host_pids, wait_processes_gone
from tests.batch.test_batch_local_api import (  # noqa: F401  (fixtures)
    by_prefix,
    groups,
    qconfig,
    service,
    storage_root,
    t4,
    users,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks are on a root service")


@pytest.fixture
def root_secret():
    """A file only root may read, in a folder only root may enter."""
    folder = Path(tempfile.mkdtemp(prefix="labfleet-root-only-"))
    secret = folder / "secret"
    value = secrets.token_hex(16)
    secret.write_text(value + "\n")
    secret.chmod(0o600)
    yield secret, value
    shutil.rmtree(folder)


async def submit(service, token, body):
    r = await service.call("POST", "api/jobs", token, body)
    assert r.status == 201, r.text
    return r.body


async def finished(service, token, job):
    return await service.wait_state(job["id"], token, {"succeeded", "failed", "cancelled"})


async def test_a_log_replaced_by_a_link_is_not_read_as_root(service, users, root_secret):
    secret, value = root_secret
    _, token = by_prefix(users, "alice")
    job = await submit(
        service, token, {"script": f"echo mine; rm -f logs/0.log; ln -s {secret} logs/0.log"}
    )
    assert (await finished(service, token, job))["state"] == "succeeded"
    for query in ("index=0", "index=0&follow=1"):
        r = await service.call("GET", f"api/jobs/{job['id']}/logs?{query}", token)
        assert value not in r.text, query
        assert r.status == 409 and "symbolic link" in r.body["message"], r.text
    # the job folder moved aside and made again, with the link in it: still not followed
    workdir = Path(job["workdir"])
    again = await submit(
        service,
        token,
        {
            "script": f"mv {workdir} {workdir}.old && mkdir -p {workdir}/logs && "
            f"ln -s {secret} {workdir}/logs/0.log"
        },  # fmt: skip
    )
    assert (await finished(service, token, again))["state"] == "succeeded"
    r = await service.call("GET", f"api/jobs/{job['id']}/logs?index=0", token)
    assert value not in r.text and r.status == 409, r.text


async def test_a_fifo_or_hard_link_as_log_neither_hangs_nor_leaks(service, users, root_secret):
    _, token = by_prefix(users, "alice")
    job = await submit(service, token, {"script": "rm -f logs/0.log; mkfifo logs/0.log"})
    assert (await finished(service, token, job))["state"] == "succeeded"
    r = await asyncio.wait_for(
        service.call("GET", f"api/jobs/{job['id']}/logs?index=0", token), timeout=10
    )
    assert r.status == 409 and "not a plain file" in r.body["message"], r.text


async def test_a_later_completions_log_linked_to_roots_file_is_not_taken_over(
    service, users, root_secret
):
    secret, value = root_secret
    before = secret.stat()
    _, token = by_prefix(users, "alice")
    job = await submit(
        service,
        token,
        {
            "script": f'[ "$JOB_COMPLETION_INDEX" = 0 ] && ln -s {secret} logs/1.log; '
            "echo output of $JOB_COMPLETION_INDEX",
            "completions": 2,
            "parallelism": 1,
        },
    )
    done = await finished(service, token, job)
    after = secret.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        before.st_uid,
        before.st_gid,
        0o600,
    )
    assert secret.read_text() == value + "\n"  # nothing appended
    # completion 1 could not open its log (as the user): the job says why
    assert done["state"] == "failed", done
    assert "cannot open logs/1.log" in done["message"], done


async def test_a_batch_folder_linked_elsewhere_gets_nothing_written(service, users):
    _, token = by_prefix(users, "alice")
    target = Path(tempfile.mkdtemp(prefix="labfleet-root-target-"))
    try:
        job = await submit(service, token, {"script": f"rm -rf ~/batch && ln -s {target} ~/batch"})
        assert (await finished(service, token, job))["state"] == "succeeded"
        r = await service.call(
            "POST", "api/jobs", token, {"script": "cat in.txt", "files": {"in.txt": "x"}}
        )
        assert r.status == 400, r.text
        assert "cannot create the job's folder" in r.body["message"], r.text
        assert list(target.iterdir()) == []  # nothing created in root's folder
        assert stat.S_IMODE(target.stat().st_mode) == 0o700 and target.stat().st_uid == 0
    finally:
        shutil.rmtree(target)


async def test_nothing_a_job_starts_outlives_it(service, users):
    _, token = by_prefix(users, "alice")
    tag = uuid.uuid4().int % 10**6 + 1000
    # detached (setsid), double-forked, and deaf to SIGTERM: all end with the job
    escape = (
        f"setsid sleep {tag}.1 & (sleep {tag}.2 &) & "
        f"sh -c \"trap '' TERM; exec sleep {tag}.3\" & echo started"
    )
    job = await submit(service, token, {"script": escape})
    assert (await finished(service, token, job))["state"] == "succeeded"
    assert await asyncio.to_thread(wait_processes_gone, host_pids(f"sleep {tag}."), 5) == []
    assert host_pids(f"sleep {tag}.") == []

    # cancelled while its TERM-deaf children run
    job = await submit(service, token, {"script": escape.replace("echo started", "wait")})
    await service.wait_state(job["id"], token, {"running"})
    for _ in range(50):
        if len(host_pids(f"sleep {tag}.")) >= 3:
            break
        await asyncio.sleep(0.1)
    assert len(host_pids(f"sleep {tag}.")) >= 3
    r = await service.call("DELETE", f"api/jobs/{job['id']}", token)
    assert r.body["state"] == "cancelled"
    assert await asyncio.to_thread(wait_processes_gone, host_pids(f"sleep {tag}."), 15) == []

    # and past its time limit
    job = await submit(
        service, token, {"script": escape.replace("echo started", "wait"), "max_run_time": 2}
    )
    done = await service.wait_state(job["id"], token, {"failed", "succeeded"}, timeout=30)
    assert done["state"] == "failed" and "max_run_time" in done["message"]
    assert await asyncio.to_thread(wait_processes_gone, host_pids(f"sleep {tag}."), 15) == []
