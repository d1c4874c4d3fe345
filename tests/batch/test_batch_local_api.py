"""The batch service with the local backend, for real: a real JupyterHub for auth (HubAuth),
the tornado app on loopback, jobs as real processes under mapped uids."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from labfleet_batch import client as batch_client
from labfleet_batch.local import LocalBackend
from labfleet_batch.queues import parse_queue_config
from labfleet_batch.validation import Limits
from labfleet_hub.posix_ids import hub_api_ids
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.devices import DeviceAllocator
from labfleet_spawner.nvml import GpuDevice
from labfleet_spawner.storage import DEFAULT_UID_BASE
from tornado import web

from tests.batch.harness import (
    PREFIX,
    cross_tenant_matrix,
    host_pids,
    make_context,
    running_service,
    wait_processes_gone,
)
from tests.unit.test_local_spawner import make_spawner

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


@pytest.fixture
def groups():
    """Fresh group names per test: the hub is shared by the session."""
    return {"ml": unique("ml"), "cms": unique("cms"), "phy": unique("phy")}


@pytest.fixture
def qconfig(groups):
    return parse_queue_config(
        {
            "groups": {
                groups["ml"]: {"cpu": 8, "memory": "32Gi", "accelerators": {"t4": 2}},
                groups["cms"]: {"cpu": 1, "memory": "8Gi", "max_running": 1},
                groups["phy"]: {"cpu": 4, "memory": "8Gi"},
            }
        },
        CATALOGUE,
    )


@pytest.fixture
def storage_root():
    # pytest's tmp dirs are 0700: users' jobs under their own uids could not reach them
    root = Path(tempfile.mkdtemp(prefix="labfleet-batch-"))
    root.chmod(0o755)
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def t4():
    return GpuDevice(0, "GPU-fake-t4-0", "Tesla T4")


@contextlib.asynccontextmanager
async def local_service(hub, qconfig, storage_root, devices, **backend_options):
    backend = LocalBackend(
        qconfig,
        str(storage_root),
        allocator=DeviceAllocator(devices),
        hub_ids=hub_api_ids(hub.url, hub.batch_token),
        kill_grace=2,
        **backend_options,
    )
    ctx = make_context(
        backend, CATALOGUE, qconfig, hub, limits=Limits(min_run_time=1), log_poll_interval=0.2
    )
    async with running_service(ctx) as svc:
        yield svc
    await backend.close()


@pytest.fixture
async def service(hub, qconfig, storage_root, t4):
    async with local_service(hub, qconfig, storage_root, [t4]) as svc:
        yield svc


@pytest.fixture
def users(hub, groups):
    """name -> (token, hub groups). carol administers ml through the hub group ml-admins."""
    spec = {
        unique("alice"): [groups["ml"]],
        unique("bob"): [groups["cms"]],
        unique("carol"): [groups["ml"], f"{groups['ml']}-admins"],
        unique("dave"): [groups["phy"]],
    }
    return {name: (hub.add_user(name, g), set(g)) for name, g in spec.items()}


def by_prefix(users, prefix):
    return next((n, t) for n, (t, _) in users.items() if n.startswith(prefix))


def hub_user_id(hub, name) -> int:
    """The number of the user's uid (labfleet_hub.posix_registry), once allocated."""
    return hub.db_ids(name)[0]


async def test_indexed_job_runs_as_mapped_uid_with_files_and_logs(service, hub, users, groups):
    alice, token = by_prefix(users, "alice")
    r = await service.call(
        "POST",
        "api/jobs",
        token,
        {
            "name": "idx",
            "script": "echo index=$JOB_COMPLETION_INDEX uid=$(id -u); cat in.txt; pwd",
            "files": {"in.txt": "payload\n"},
            "completions": 3,
            "parallelism": 2,
            "group": groups["ml"],
        },
    )
    assert r.status == 201, r.text
    job = r.body
    assert job["id"].startswith(f"{groups['ml']}/idx-") and job["user"] == alice
    done = await service.wait_state(job["id"], token, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    assert done["succeeded"] == 3
    expected_uid = DEFAULT_UID_BASE + hub_user_id(hub, alice) if os.geteuid() == 0 else os.geteuid()
    for index in range(3):
        r = await service.call("GET", f"api/jobs/{job['id']}/logs?index={index}", token)
        assert r.status == 200
        lines = r.text.splitlines()
        assert lines[0] == f"index={index} uid={expected_uid}"
        assert lines[1] == "payload"
        assert lines[2] == done["workdir"]  # results stay in the home, per job
    assert Path(done["workdir"]).stat().st_uid == expected_uid
    r = await service.call("GET", f"api/jobs/{job['id']}/logs?index=3", token)
    assert r.status == 400 and "allowed: 0 to 2" in r.body["message"]


async def test_job_environment_holds_none_of_the_services_secrets(service, hub, users, monkeypatch):
    """The service's own hub token may read every user's ids: a job must never see it."""
    # what a hub-managed service has in its environment
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.batch_token)
    monkeypatch.setenv("JUPYTERHUB_CLIENT_ID", "service-batch")
    monkeypatch.setenv("LABFLEET_TEST_SECRET", "s3cr3t-value")
    _, token = by_prefix(users, "alice")
    job = (await service.call("POST", "api/jobs", token, {"script": "env"})).body
    done = await service.wait_state(job["id"], token, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    env = (await service.call("GET", f"api/jobs/{job['id']}/logs?index=0", token)).text
    assert "LABFLEET_BATCH_JOB=" in env  # the job's own variables are there
    for leaked in (hub.batch_token, "JUPYTERHUB_", "s3cr3t-value"):
        assert leaked not in env


async def test_rejected_request_creates_nothing(service, users, storage_root):
    _, token = by_prefix(users, "alice")
    r = await service.call("POST", "api/jobs", token, {"script": "x", "completions": 5000})
    assert r.status == 400
    assert r.body["message"] == "completions 5000 is out of range; allowed: 1 to 1000"
    r = await service.call("POST", "api/jobs", token, {"script": "x", "profile": "gpu-a100"})
    assert r.status == 400 and "not available to you" in r.body["message"]
    r = await service.call("GET", "api/jobs", token)
    assert r.body["jobs"] == []
    assert not (storage_root / "home").exists() or not any((storage_root / "home").iterdir())


async def test_group_quota_queues_second_job_with_position(service, users, groups):
    bob, token = by_prefix(users, "bob")  # cms: max_running 1, cpu 1
    first = (await service.call("POST", "api/jobs", token, {"script": "sleep 30"})).body
    await service.wait_state(first["id"], token, {"running"})
    second = (await service.call("POST", "api/jobs", token, {"script": "echo second"})).body
    third = (await service.call("POST", "api/jobs", token, {"script": "echo third"})).body
    r = await service.call("GET", f"api/jobs/{third['id']}", token)
    assert r.body["state"] == "queued"
    assert r.body["queue"]["position"] == 2 and r.body["queue"]["pending_in_queue"] == 2
    r = await service.call("GET", f"api/jobs/{second['id']}", token)
    assert r.body["queue"]["position"] == 1
    assert "insufficient quota" in r.body["queue"]["message"], r.body
    # the client's progress line shows the position
    assert "position 1 of 2" in batch_client.describe(r.body)
    r = await service.call("DELETE", f"api/jobs/{first['id']}", token)
    assert r.status == 200 and r.body["state"] == "cancelled"
    done = await service.wait_state(second["id"], token, {"succeeded"})
    assert done["state"] == "succeeded"
    await service.wait_state(third["id"], token, {"succeeded"})


async def test_waiting_job_whose_folder_vanished_fails_and_frees_its_slot(service, users):
    bob, token = by_prefix(users, "bob")  # cms: max_running 1
    first = (await service.call("POST", "api/jobs", token, {"script": "sleep 30"})).body
    await service.wait_state(first["id"], token, {"running"})
    second = (await service.call("POST", "api/jobs", token, {"script": "echo second"})).body
    third = (await service.call("POST", "api/jobs", token, {"script": "echo third"})).body
    # someone removes the waiting job's folder (a clean-up script, a full disk...)
    shutil.rmtree(second["workdir"])
    await service.call("DELETE", f"api/jobs/{first['id']}", token)
    failed = await service.wait_state(second["id"], token, {"failed", "succeeded"}, timeout=20)
    assert failed["state"] == "failed"
    assert "could not start the job's processes" in failed["message"], failed
    # not stuck "running" holding the group's only slot: the next job runs
    done = await service.wait_state(third["id"], token, {"failed", "succeeded"}, timeout=20)
    assert done["state"] == "succeeded", done


async def test_gpu_exclusive_and_shared_allocator(service, users, groups, t4):
    alice, token = by_prefix(users, "alice")
    body = {"script": "echo gpu=$CUDA_VISIBLE_DEVICES; sleep 30", "accelerator": "t4"}
    first = (await service.call("POST", "api/jobs", token, body)).body
    await service.wait_state(first["id"], token, {"running"})
    allocator = service.ctx.backend.allocator
    assert allocator.owner_of(t4.uuid) == f"batch:{first['id']}"
    # within quota (t4: 2) but the machine's only T4 is taken: waits, says why
    second = (await service.call("POST", "api/jobs", token, body)).body
    r = await service.call("GET", f"api/jobs/{second['id']}", token)
    assert r.body["state"] == "queued"
    assert "no NVIDIA Tesla T4 (16 GB) is free" in r.body["queue"]["message"], r.body
    await asyncio.sleep(0.5)
    r = await service.call("GET", f"api/jobs/{first['id']}/logs", token)
    assert r.text.strip() == f"gpu={t4.uuid}"
    await service.call("DELETE", f"api/jobs/{first['id']}", token)
    await service.wait_state(second["id"], token, {"running"})
    assert allocator.owner_of(t4.uuid) == f"batch:{second['id']}"
    await service.call("DELETE", f"api/jobs/{second['id']}", token)
    assert allocator.owner_of(t4.uuid) is None


async def test_gpu_exclusive_between_jobs_and_notebooks_of_another_process(
    hub, qconfig, storage_root, t4, users, tmp_path
):
    """The batch service and the hub are two processes; the claims registry joins them.

    The hub's side is a LocalGPUSpawner with its own allocator on the same file,
    as in a hub process of its own.
    """
    claims = tmp_path / "device-claims.json"
    notebooks = DeviceAllocator([t4], claims_path=claims, component="notebooks")
    spawner = make_spawner(tmp_path, notebooks, cmd=["/bin/false-never-run"])
    spawner.apply_selection({"profile": "gpu-t4"})
    _, token = by_prefix(users, "alice")
    body = {"script": "echo gpu=$CUDA_VISIBLE_DEVICES; sleep 30", "accelerator": "t4"}
    async with local_service(
        hub, qconfig, storage_root, [t4], device_claims_path=str(claims), poll_interval=0.2
    ) as service:
        job = (await service.call("POST", "api/jobs", token, body)).body
        await service.wait_state(job["id"], token, {"running"})
        assert notebooks.owner_of(t4.uuid) == f"batch:{job['id']}"
        # the notebook is refused with the usual sentence, and nothing is held or started
        assert spawner.availability()["t4"] == (0, 1)
        with pytest.raises(web.HTTPError) as refused:
            await spawner.start()
        assert refused.value.status_code == 503
        assert refused.value.jupyterhub_message == (
            "no NVIDIA Tesla T4 (16 GB) is free: 1 in total, all in use; "
            "try another profile or later"
        )
        assert spawner.proc is None and notebooks.owner_of(t4.uuid) == f"batch:{job['id']}"
        await service.call("DELETE", f"api/jobs/{job['id']}", token)
        # the other way round: a notebook holds it, a job waits and says why ...
        spawner.devices = notebooks.allocate(spawner.device_owner, spawner.selection.accelerator)
        second = (await service.call("POST", "api/jobs", token, body)).body
        r = await service.call("GET", f"api/jobs/{second['id']}", token)
        assert r.body["state"] == "queued"
        assert "no NVIDIA Tesla T4 (16 GB) is free" in r.body["queue"]["message"], r.body
        await asyncio.sleep(0.6)  # retried meanwhile, still refused
        r = await service.call("GET", f"api/jobs/{second['id']}", token)
        assert r.body["state"] == "queued" and notebooks.owner_of(t4.uuid) == "alice/"
        # ... and starts by itself once the notebook stops: the hub cannot tell it
        spawner.clear_state()
        await service.wait_state(second["id"], token, {"running"}, timeout=10)
        assert notebooks.owner_of(t4.uuid) == f"batch:{second['id']}"
        await service.call("DELETE", f"api/jobs/{second['id']}", token)
        assert notebooks.owner_of(t4.uuid) is None


async def test_cancel_kills_process_group_and_deadline_fails_job(service, users):
    _, token = by_prefix(users, "alice")
    marker = f"{uuid.uuid4().int % 10**6 + 1000}.5"  # sleep's argument, unique to this test
    script = f"sleep {marker} & echo started > started; wait"
    job = (await service.call("POST", "api/jobs", token, {"script": script})).body
    await service.wait_state(job["id"], token, {"running"})
    workdir = Path(job["workdir"])
    for _ in range(50):
        if (workdir / "started").exists():
            break
        await asyncio.sleep(0.1)
    pids = host_pids(f"sleep {marker}")
    assert pids, "the job's background sleep is not running"
    r = await service.call("DELETE", f"api/jobs/{job['id']}", token)
    assert r.body["state"] == "cancelled"
    # SIGTERM to the whole job: the script and its background child end
    assert await asyncio.to_thread(wait_processes_gone, pids) == []
    slow = (
        await service.call("POST", "api/jobs", token, {"script": "sleep 60", "max_run_time": 1})
    ).body
    done = await service.wait_state(slow["id"], token, {"failed", "succeeded"}, timeout=20)
    assert done["state"] == "failed" and "max_run_time of 1 s" in done["message"]


async def test_follow_logs_streams_until_the_end(service, users):
    _, token = by_prefix(users, "alice")
    script = "for i in 1 2 3; do echo line$i; sleep 0.4; done"
    job = (await service.call("POST", "api/jobs", token, {"script": script})).body
    r = await service.call("GET", f"api/jobs/{job['id']}/logs?follow=1", token, timeout=30)
    assert r.status == 200
    assert r.text.split() == ["line1", "line2", "line3"]


async def test_authentication_through_the_hub(service, hub, users, groups):
    r = await service.call("GET", "api/info", None)
    assert r.status == 401 and "Authorization: token" in r.body["message"]
    r = await service.call("GET", "api/info", "not-a-token")
    assert r.status == 403
    name = unique("frank")
    no_access = hub.add_user(name, [groups["ml"]], scopes=["read:users:groups!user"])
    r = await service.call("GET", "api/info", no_access)
    assert r.status == 403 and "access:services!service=batch" in r.body["message"]
    # the access scope is all a token needs: the hub always tells a token's owner's groups
    gina = unique("gina")
    only_access = hub.add_user(gina, [groups["cms"]], scopes=["access:services!service=batch"])
    r = await service.call("GET", "api/info", only_access)
    assert r.status == 200 and r.body["user"] == gina and list(r.body["groups"]) == [groups["cms"]]
    # groups come from the hub, not from the request
    alice, token = by_prefix(users, "alice")
    r = await service.call("GET", "api/info", token)
    assert r.status == 200 and r.body["user"] == alice
    assert list(r.body["groups"]) == [groups["ml"]] and r.body["admin_of"] == []


async def test_group_admin_sees_and_cancels_group_jobs(service, users, groups):
    alice, alice_token = by_prefix(users, "alice")
    carol, carol_token = by_prefix(users, "carol")
    job = (await service.call("POST", "api/jobs", alice_token, {"script": "sleep 30"})).body
    r = await service.call("GET", f"api/jobs?group={groups['ml']}", alice_token)
    assert r.status == 403 and "only admins" in r.body["message"]
    r = await service.call("GET", f"api/jobs?group={groups['ml']}", carol_token)
    assert r.status == 200 and [j["id"] for j in r.body["jobs"]] == [job["id"]]
    r = await service.call("GET", "api/info", carol_token)
    assert r.body["admin_of"] == [groups["ml"]]
    r = await service.call("DELETE", f"api/jobs/{job['id']}", carol_token)
    assert r.status == 200 and r.body["state"] == "cancelled"
    # but a plain member does not see a fellow member's job
    carols = (await service.call("POST", "api/jobs", carol_token, {"script": "true"})).body
    r = await service.call("GET", f"api/jobs/{carols['id']}", alice_token)
    assert r.status == 404


async def test_cross_tenant_matrix(service, users):
    jobs = {}
    for name, (token, _) in users.items():
        r = await service.call("POST", "api/jobs", token, {"script": "sleep 20"})
        assert r.status == 201, r.text
        jobs[name] = r.body["id"]
    probes, refusals, failures = await cross_tenant_matrix(service, users, jobs)
    # 4 users, 6 unordered pairs; alice and carol share ml: 5 pairs, 10 ordered, 6 probes each
    assert failures == []
    assert (probes, refusals) == (60, 60)
    # every job is still there and untouched for its owner
    for name, (token, _) in users.items():
        r = await service.call("GET", f"api/jobs/{jobs[name]}", token)
        assert r.status == 200 and r.body["state"] != "cancelled"


async def test_cli_and_magic_through_the_service(service, users, groups, capsys):
    _, token = by_prefix(users, "alice")
    c = batch_client.BatchClient(url=service.url, token=token)

    def cli(*argv):
        return batch_client.main(list(argv), client=c)

    rc = await asyncio.to_thread(cli, "submit", "--name", "snake", "--", "echo", "hello")
    out = capsys.readouterr().out.strip()
    assert rc == 0 and out.startswith(f"{groups['ml']}/snake-") and "\n" not in out
    job_id = out
    rc = await asyncio.to_thread(cli, "wait", job_id)
    captured = capsys.readouterr()
    assert rc == 0 and "succeeded" in captured.err
    await asyncio.to_thread(cli, "status", job_id)
    assert capsys.readouterr().out.strip() == "success"
    await asyncio.to_thread(cli, "logs", job_id)
    assert capsys.readouterr().out == "hello\n"
    rc = await asyncio.to_thread(cli, "submit", "--", "sh", "-c", "exit 3")
    failing = capsys.readouterr().out.strip()
    assert await asyncio.to_thread(cli, "wait", failing) == 1
    await asyncio.to_thread(cli, "status", failing)
    assert capsys.readouterr().out.strip() == "failed"
    rc = await asyncio.to_thread(cli, "submit", "--profile", "nope", "--", "true")
    assert rc == 2 and "profile 'nope' is not available" in capsys.readouterr().err
    job = await asyncio.to_thread(
        batch_client.batch_magic, "--group " + groups["ml"] + " --wait --logs", "echo magic", c
    )
    out = capsys.readouterr().out
    assert job["state"] == "succeeded" and "magic" in out and "submitted" in out


def test_load_ipython_extension_registers_cell_magic():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    batch_client.load_ipython_extension(shell)
    assert "batch" in shell.magics_manager.magics["cell"]


async def test_pages_show_a_failed_job_by_name_with_its_reason_and_log(service, users):
    """The queue page and the job page, read with a token (browsers sign in with OAuth)."""
    alice, token = by_prefix(users, "alice")
    bob, bob_token = by_prefix(users, "bob")
    r = await service.call("POST", "api/jobs", token, {"command": ["python3", "missing_train.py"]})
    assert r.status == 201 and r.body["display_name"] == "missing-train", r.text
    job_id = r.body["id"]
    done = await service.wait_state(job_id, token, {"failed"})
    assert "exit code 2" in done["message"], done
    page = await service.call("GET", "", token)
    assert page.status == 200 and '<nav class="navbar' in page.text
    row = page.text.split(f'data-id="{job_id}">', 1)[1].split("</tr>", 1)[0]
    assert ">missing-train</a>" in row and "text-bg-danger" in row
    assert "exit code 2" in row.split('<td class="reason small">', 1)[1].split("</td>", 1)[0]
    href = f'href="{PREFIX}jobs/{job_id}">logs</a>'
    assert href in row
    detail = await service.call("GET", f"jobs/{job_id}", token)
    assert detail.status == 200 and "missing_train.py" in detail.text
    assert "can&#x27;t open file" in detail.text.split('id="job-log"', 1)[1]
    # another group's member: 404, as for a job that does not exist, in the hub's layout
    refused = await service.call("GET", f"jobs/{job_id}", bob_token)
    assert refused.status == 404 and "missing_train" not in refused.text
    assert f"no job {job_id} that you may see" in refused.text and 'id="logout"' in refused.text
    assert (await service.call("GET", f"jobs/{job_id}?index=1", token)).status == 400
