"""LocalGPUSpawner starting real processes on 127.0.0.1, with an injected allocator.

No GPU is needed: the allocator is built from fake devices, and what is
checked is what the started process sees (environment, working directory,
uid and groups), that a refused allocation starts nothing, and that a real
``jupyterhub-singleuser`` comes up in the user's home against a stub hub API.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.objects import Hub
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.devices import DeviceAllocator
from labfleet_spawner.local import LocalGPUSpawner
from labfleet_spawner.nvml import Discovery, GpuDevice, MigDevice
from tornado import web

from tests.conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(REPO / "config" / "catalogue.yaml")
SYSTEM_PYTHON = "/usr/bin/python3"
# Next to this Python (a virtual environment need not be on PATH), else on PATH.
SINGLEUSER = shutil.which("jupyterhub-singleuser", path=str(Path(sys.executable).parent)) or (
    shutil.which("jupyterhub-singleuser")
)

# Writes what the server process sees to $HOME/probe.json, then idles like a server.
PROBE = """
import json, os, sys, time
seen = {
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "cwd": os.getcwd(), "argv": sys.argv[1:], "env": dict(os.environ),
}
with open(os.path.join(os.environ["HOME"], "probe.json"), "w") as f:
    json.dump(seen, f)
while True:
    time.sleep(0.2)
"""


def fake_user(name="alice", id=1, groups=(("ml", 2), ("fpga", 3))):
    return SimpleNamespace(
        name=name,
        id=id,
        escaped_name=name,
        url=f"/user/{name}/",
        groups=[SimpleNamespace(name=g, id=i) for g, i in groups],
    )


def machine() -> DeviceAllocator:
    mig = MigDevice("MIG-aaaa-0001", "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "1g.10gb", 2, "GPU-a100")
    return DeviceAllocator.from_discovery(
        Discovery(
            (
                GpuDevice(0, "GPU-t4-0000", "Tesla T4"),
                GpuDevice(1, "GPU-t4-0001", "Tesla T4"),
                GpuDevice(
                    2, "GPU-a100", "NVIDIA A100-SXM4-80GB", mig_enabled=True, mig_devices=(mig,)
                ),
            )
        )
    )


def spawner_for(tmp_path, allocator, user=None, **kwargs):
    kwargs.setdefault("cmd", [sys.executable, "-c", PROBE])
    kwargs.setdefault("isolate_users", False)
    # a root test run: the single-user installation's explicit acknowledgement
    kwargs.setdefault("allow_root_notebooks", True)
    return LocalGPUSpawner(
        user=user or fake_user(),
        hub=Hub(ip="127.0.0.1", port=free_port(), base_url="/hub/"),
        ip="127.0.0.1",
        catalogue_data=CATALOGUE,
        storage_root=str(tmp_path / "srv"),
        device_allocator=allocator,
        api_token="server-api-token",
        oauth_client_id="jupyterhub-user-alice",
        interrupt_timeout=2,
        term_timeout=2,
        kill_timeout=2,
        **kwargs,
    )


@pytest.fixture
def world_path():
    """A directory every uid can traverse (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="labfleet-local-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def wait_for_probe(spawner, timeout=15) -> dict:
    path = spawner.storage.home / "probe.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        assert await spawner.poll() is None, "the server process exited early"
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} did not appear in {timeout}s")


async def test_gpu_server_sees_its_devices_and_home(tmp_path):
    allocator = machine()
    spawner = spawner_for(tmp_path, allocator, environment={"OAUTH_CLIENT_SECRET": "leak"})
    spawner.apply_selection({"profile": "gpu-t4", "count": 2, "size": "small"})
    await spawner.start()
    try:
        seen = await wait_for_probe(spawner)
        home = str(tmp_path / "srv" / "home" / "alice")
        assert seen["cwd"] == home and seen["env"]["HOME"] == home
        assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-t4-0000,GPU-t4-0001"
        assert seen["env"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-t4-0000,GPU-t4-0001"
        assert seen["env"]["JUPYTERHUB_ROOT_DIR"] == home
        assert seen["env"]["CPU_LIMIT"] == "1.0" and seen["env"]["MEM_LIMIT"] == str(2 * 2**30)
        assert seen["env"]["JUPYTERHUB_API_TOKEN"] == "server-api-token"
        assert "OAUTH_CLIENT_SECRET" not in seen["env"]
        if os.geteuid() == 0:
            assert "--allow-root" in seen["argv"]
        assert spawner.get_state()["labfleet_devices"] == ["GPU-t4-0000", "GPU-t4-0001"]
        assert allocator.free_and_total(CATALOGUE.accelerators["t4"]) == (0, 2)
    finally:
        await spawner.stop()
    assert await spawner.poll() is not None
    assert allocator.free_and_total(CATALOGUE.accelerators["t4"]) == (2, 2), "released on stop"


async def test_refused_allocation_starts_no_process(tmp_path):
    allocator = machine()
    first = spawner_for(tmp_path, allocator)
    first.apply_selection({"profile": "mig-small"})
    await first.start()
    try:
        seen = await wait_for_probe(first)
        assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "MIG-aaaa-0001"
        marker = tmp_path / "started"
        second = spawner_for(
            tmp_path,
            allocator,
            user=fake_user("bob", 2, ()),
            cmd=[sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        )
        second.apply_selection({"profile": "mig-small"})
        with pytest.raises(web.HTTPError) as refused:
            await second.start()
        assert refused.value.status_code == 503
        assert "is free: 1 in total, all in use" in refused.value.jupyterhub_message
        assert second.proc is None and second.pid == 0
        await asyncio.sleep(0.5)
        assert not marker.exists(), "no process was started"
        assert allocator.held_by("bob/") == []
    finally:
        await first.stop()
    assert allocator.held_by("alice/") == []


async def test_cpu_profile_sees_no_gpu(tmp_path):
    spawner = spawner_for(tmp_path, machine())
    spawner.apply_selection({"profile": "cpu"})
    await spawner.start()
    try:
        seen = await wait_for_probe(spawner)
        assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ""
        assert seen["env"]["LABFLEET_PROFILE"] == "cpu"
    finally:
        await spawner.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another uid needs a root hub")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
async def test_isolated_server_runs_as_mapped_ids(world_path):
    # /usr/bin/python3 is readable by every uid, unlike a Python under /root.
    tmp_path = world_path
    spawner = spawner_for(
        tmp_path, machine(), isolate_users=True, cmd=[SYSTEM_PYTHON, "-c", PROBE], uid_base=200000
    )
    spawner.apply_selection({"profile": "gpu-t4"})
    await spawner.start()
    try:
        seen = await wait_for_probe(spawner)
        assert (seen["uid"], seen["gid"]) == (200001, 200001)
        assert set(seen["groups"]) >= {300002, 300003}
        assert 0 not in seen["groups"], "no root group membership leaks"
        assert "--allow-root" not in seen["argv"]
        assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-t4-0000"
        home = Path(seen["cwd"])
        assert (home.stat().st_uid, home.stat().st_mode & 0o777) == (200001, 0o700)
        group_dir = tmp_path / "srv" / "groups" / "ml"
        assert (group_dir.stat().st_gid, group_dir.stat().st_mode & 0o7777) == (300002, 0o2770)
    finally:
        await spawner.stop()


# The user's own server plants links where root will later work, then idles.
PLANT = """
import os, sys, time
target = sys.argv[1]
home = os.environ["HOME"]
os.symlink(target, os.path.join(home, ".jupyterhub"))
for group in os.environ["LABFLEET_GROUP_DIRS"].split(":"):
    os.symlink(target, os.path.join(group, os.path.basename(group)))
open(os.path.join(home, "planted"), "w").close()
while True:
    time.sleep(0.2)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another uid needs a root hub")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
async def test_links_a_users_server_plants_are_never_followed_by_the_next_start(world_path):
    """As root, the next start prepares storage and certificates without following them."""
    etc = world_path / "etc"  # an /etc-like folder of root's
    etc.mkdir(mode=0o755)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    before = [(p.name, p.stat().st_uid, p.stat().st_mode) for p in (etc, etc / "passwd")]
    spawner = spawner_for(
        world_path, machine(), isolate_users=True, uid_base=200000,
        cmd=[SYSTEM_PYTHON, "-c", PLANT, str(etc)],
    )  # fmt: skip
    spawner.apply_selection({"profile": "cpu"})
    await spawner.start()
    try:
        planted = world_path / "srv" / "home" / "alice" / "planted"
        deadline = time.monotonic() + 15
        while not planted.exists():
            assert await spawner.poll() is None, "the planting server exited early"
            assert time.monotonic() < deadline, "the server planted nothing in 15s"
            await asyncio.sleep(0.1)
    finally:
        await spawner.stop()
    spawner.clear_state()
    await spawner._prepare()  # the next start's storage: fine, links inside are left alone
    certs = world_path / "hub-certs"
    certs.mkdir()
    paths = {key: str(certs / f"{key}.pem") for key in ("keyfile", "certfile", "cafile")}
    for path in paths.values():
        Path(path).write_text("pem")
    with pytest.raises(web.HTTPError) as refused:
        await spawner.move_certs(paths)
    assert "symbolic link" in refused.value.jupyterhub_message
    assert sorted(os.listdir(etc)) == ["passwd"]
    assert [(p.name, p.stat().st_uid, p.stat().st_mode) for p in (etc, etc / "passwd")] == before
    assert (etc / "passwd").read_text().startswith("root:")


@pytest.mark.skipif(os.geteuid() != 0, reason="the probe drops to another uid")
async def test_isolation_probe_is_cached(tmp_path):
    LocalGPUSpawner._isolation_probes.clear()
    spawner = spawner_for(tmp_path, machine(), isolate_users="auto")
    first = await spawner._python_usable_unprivileged()
    assert isinstance(first, bool)
    if first:
        assert await spawner._should_isolate() is True
    else:  # never a fallback to root notebooks
        with pytest.raises(web.HTTPError, match="cannot run"):
            await spawner._should_isolate()
    assert len(LocalGPUSpawner._isolation_probes) == 1


class _StubHubApi(web.RequestHandler):
    """Just enough hub API for jupyterhub-singleuser to start: the version check."""

    def get(self, _path=""):
        self.set_header("X-JupyterHub-Version", "6.1.1")
        self.write({"version": "6.1.1"})

    def post(self, _path=""):
        self.write({})


@pytest.mark.skipif(not SINGLEUSER, reason="no jupyterhub-singleuser")
async def test_real_singleuser_server_serves_from_home(tmp_path):
    spawner = spawner_for(
        tmp_path,
        machine(),
        cmd=[SINGLEUSER],
        # Without a hub database there is no Server object to derive the prefix from.
        environment={"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"},
    )
    stub = web.Application([(r"/hub/api(.*)", _StubHubApi)])
    server = stub.listen(spawner.hub.port, "127.0.0.1")
    spawner.apply_selection({"profile": "gpu-t4"})
    try:
        ip, port = await spawner.start()
        url = f"http://{ip}:{port}/user/alice/api"
        deadline = time.monotonic() + 30
        while True:
            assert await spawner.poll() is None, "jupyterhub-singleuser exited"
            try:
                reply = await asyncio.to_thread(urllib.request.urlopen, url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
        assert "version" in json.loads(reply.read())
        assert spawner.storage.home.is_dir()
    finally:
        await spawner.stop()
        server.stop()
    assert spawner.allocator.held_by("alice/") == []
