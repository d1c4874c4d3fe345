"""LocalGPUSpawner without starting processes: env, secrets, refusal, state, discovery."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.objects import Hub
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.devices import DeviceAllocator
from labfleet_spawner.local import LocalGPUSpawner, filter_secret_env
from labfleet_spawner.nvml import Discovery, GpuDevice, discover
from tornado import web
from traitlets.config import Config

from tests.unit.test_nvml import FakeNvml, mixed_machine

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(REPO / "config" / "catalogue.yaml")


def fake_user(name="alice", id=1, groups=("ml",)):
    return SimpleNamespace(
        name=name,
        id=id,
        escaped_name=name,
        url=f"/user/{name}/",
        groups=[SimpleNamespace(name=g, id=i + 10) for i, g in enumerate(groups)],
    )


def two_t4() -> DeviceAllocator:
    return DeviceAllocator.from_discovery(
        Discovery((GpuDevice(0, "GPU-t4-0", "Tesla T4"), GpuDevice(1, "GPU-t4-1", "Tesla T4")))
    )


@pytest.fixture(autouse=True)
def _no_shared_allocator():
    LocalGPUSpawner.use_allocator(None)
    yield
    LocalGPUSpawner.use_allocator(None)


def make_spawner(tmp_path, allocator=None, user=None, **kwargs):
    kwargs.setdefault("isolate_users", False)
    # a root test run: the single-user installation's explicit acknowledgement
    kwargs.setdefault("allow_root_notebooks", True)
    return LocalGPUSpawner(
        user=user or fake_user(),
        hub=Hub(),
        catalogue_data=CATALOGUE,
        storage_root=str(tmp_path / "srv"),
        device_allocator=allocator,
        api_token="the-api-token",
        oauth_client_id="jupyterhub-user-alice",
        **kwargs,
    )


def test_filter_secret_env():
    env = {
        "PATH": "/usr/bin",
        "JUPYTERHUB_API_TOKEN": "t",
        "JPY_API_TOKEN": "t",
        "OAUTH_CLIENT_SECRET": "s",
        "IAM_CLIENT_SECRET": "s",
        "db_password": "p",
        "SSH_PRIVATE_KEY": "k",
        "GITHUB_TOKEN": "g",
        "JUPYTERHUB_CRYPT_KEY": "c",
        "INNOCENT": "the-client-secret",
    }
    kept, dropped = filter_secret_env(env, secret_values=["the-client-secret", ""])
    assert kept == {"PATH": "/usr/bin", "JUPYTERHUB_API_TOKEN": "t", "JPY_API_TOKEN": "t"}
    assert dropped == sorted(set(env) - set(kept))


def test_traits_are_configurable():
    config = Config()
    config.LocalGPUSpawner.storage_root = "/data/labfleet"
    config.LocalGPUSpawner.uid_base = 500000
    config.LocalGPUSpawner.fpga_devices = {"u55c": ["/dev/xclmgmt1"]}
    config.LocalGPUSpawner.catalogue_path = "/etc/labfleet/catalogue.yaml"
    config.LocalGPUSpawner.device_claims_path = "/var/lib/labfleet/device-claims.json"
    spawner = LocalGPUSpawner(config=config, user=fake_user(), hub=Hub())
    assert spawner.storage_root == "/data/labfleet" and spawner.uid_base == 500000
    assert spawner.fpga_devices == {"u55c": ["/dev/xclmgmt1"]}
    assert spawner.catalogue_path == "/etc/labfleet/catalogue.yaml"
    assert spawner.device_claims_path == "/var/lib/labfleet/device-claims.json"
    assert spawner.isolate_users == "auto"
    assert LocalGPUSpawner(user=fake_user(), hub=Hub()).device_claims_path == "", "off by default"
    assert callable(spawner.options_form), "the catalogue form, rendered per request"
    names = ("storage_root", "uid_base", "gid_base", "isolate_users", "fpga_devices")
    for name in (*names, "device_claims_path"):
        trait = LocalGPUSpawner.class_traits()[name]
        assert trait.metadata.get("config") and trait.help


async def test_env_of_a_gpu_server_has_devices_storage_and_no_secrets(tmp_path):
    allocator = two_t4()

    class Auth:
        client_secret = "iam-client-secret"

    spawner = make_spawner(
        tmp_path,
        allocator,
        authenticator=Auth(),
        environment={
            "OAUTH_CLIENT_SECRET": "iam-client-secret",
            "COPIED": "iam-client-secret",
            "HF_TOKEN": "x",
            "GREETING": "hello",
        },
    )
    spawner.apply_selection({"profile": "gpu-t4", "count": 2})
    spawner.devices = allocator.allocate(spawner.device_owner, spawner.selection.accelerator, 2)
    await spawner._prepare()
    env = spawner.get_env()
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-t4-0,GPU-t4-1"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-t4-0,GPU-t4-1"
    assert env["LABFLEET_PROFILE"] == "gpu-t4" and env["LABFLEET_ACCELERATOR_COUNT"] == "2"
    home = str(tmp_path / "srv" / "home" / "alice")
    assert env["HOME"] == home == env["LABFLEET_HOME"] == env["JUPYTERHUB_ROOT_DIR"]
    assert env["LABFLEET_GROUP_DIRS"] == str(tmp_path / "srv" / "groups" / "ml")
    assert env["USER"] == "alice" and env["GREETING"] == "hello"
    assert env["JUPYTERHUB_API_TOKEN"] == "the-api-token" == env["JPY_API_TOKEN"]
    assert "iam-client-secret" not in env.values()
    assert not {"OAUTH_CLIENT_SECRET", "COPIED", "HF_TOKEN"} & set(env)


async def test_cpu_profile_hides_all_gpus_and_publishes_limits(tmp_path):
    spawner = make_spawner(tmp_path, two_t4())
    spawner.apply_selection({"profile": "cpu", "size": "medium"})
    spawner.cpu_limit, spawner.mem_limit = 4.0, spawner.selection.size.memory_bytes
    env = spawner.get_env()
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["NVIDIA_VISIBLE_DEVICES"] == "none"
    assert env["CPU_LIMIT"] == "4.0" and env["MEM_LIMIT"] == str(16 * 2**30)
    assert env["LABFLEET_CPU_LIMIT"] == "4.0"


async def test_server_environment_comes_first_on_path(tmp_path):
    spawner = make_spawner(tmp_path, two_t4(), cmd=["/opt/env/bin/jupyterhub-singleuser"])
    spawner.apply_selection({"profile": "cpu"})
    path = spawner.get_env()["PATH"].split(":")
    assert path[0] == "/opt/env/bin" and path.count("/opt/env/bin") == 1


async def test_refused_allocation_starts_nothing_and_holds_nothing(tmp_path):
    allocator = two_t4()
    allocator.allocate("bob/", CATALOGUE.accelerators["t4"], 2)
    spawner = make_spawner(tmp_path, allocator, cmd=["/bin/false-never-run"])
    spawner.apply_selection({"profile": "gpu-t4"})
    with pytest.raises(web.HTTPError) as refused:
        await spawner.start()
    assert refused.value.status_code == 503
    message = (
        "no NVIDIA Tesla T4 (16 GB) is free: 2 in total, all in use; try another profile or later"
    )
    assert refused.value.jupyterhub_message == message
    assert spawner.proc is None and spawner.pid == 0
    assert allocator.held_by(spawner.device_owner) == []
    assert not (tmp_path / "srv").exists(), "no storage prepared for a refused start"


async def test_failed_start_releases_devices(tmp_path):
    allocator = two_t4()
    spawner = make_spawner(tmp_path, allocator, cmd=[str(tmp_path / "no-such-program")])
    spawner.apply_selection({"profile": "gpu-t4"})
    with pytest.raises(OSError):
        await spawner.start()
    assert allocator.held_by(spawner.device_owner) == []
    assert allocator.free_and_total(CATALOGUE.accelerators["t4"]) == (2, 2)


async def test_start_without_apply_validates_user_options(tmp_path):
    spawner = make_spawner(tmp_path, two_t4())
    # gpu-a100 is for the ml group only; this user has no groups.
    spawner.user = fake_user(groups=())
    spawner.user_options = {"profile": "gpu-a100"}
    with pytest.raises(web.HTTPError) as rejected:
        await spawner.start()
    assert rejected.value.status_code == 400 and "gpu-a100" in rejected.value.log_message


def test_state_round_trip_restores_devices(tmp_path):
    allocator = two_t4()
    spawner = make_spawner(tmp_path, allocator)
    spawner.devices = allocator.allocate(spawner.device_owner, CATALOGUE.accelerators["t4"])
    spawner.pid = 4242
    state = spawner.get_state()
    assert state == {"pid": 4242, "labfleet_devices": ["GPU-t4-0"]}

    # A hub restart: a fresh allocator, a fresh spawner loading the saved state.
    fresh = two_t4()
    again = make_spawner(tmp_path, fresh)
    again.load_state(state)
    assert [d.uuid for d in again.devices] == ["GPU-t4-0"]
    assert fresh.owner_of("GPU-t4-0") == "alice/"
    # The server turned out to be gone: clearing its state gives the GPU back.
    again.clear_state()
    assert fresh.owner_of("GPU-t4-0") is None and again.devices == []


def test_shared_allocator_comes_from_nvml_once(tmp_path):
    fake = mixed_machine()
    first = make_spawner(tmp_path, nvml_module=fake, fpga_devices={"u55c": ["/dev/xclmgmt1"]})
    second = make_spawner(tmp_path, user=fake_user("bob", 2), nvml_module=fake)
    assert first.allocator is second.allocator
    assert fake.initialised == 1
    availability = first.availability()
    assert availability["t4"] == (2, 2)
    assert availability["mig-1g.10gb"] == (2, 2)
    assert availability["rtx5000"] == (1, 1)
    assert availability["u55c"] == (1, 1)
    assert availability["a30"] == (0, 0)


def test_no_gpu_machine_offers_cpu_only(tmp_path):
    fake = FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound("missing"))
    spawner = make_spawner(tmp_path, nvml_module=fake)
    assert set(spawner.availability().values()) == {(0, 0)}


@pytest.mark.skipif(os.geteuid() != 0, reason="--allow-root is only added for a root hub")
async def test_allow_root_only_when_not_isolated(tmp_path):
    spawner = make_spawner(tmp_path, two_t4(), args=["--debug"])
    spawner.terminal_shell = []
    spawner.isolated = False
    assert spawner.get_args() == ["--debug", "--allow-root"]
    spawner.isolated = True
    assert spawner.get_args() == ["--debug"]


@pytest.mark.skipif(os.geteuid() != 0, reason="--allow-root is only added for a root hub")
def test_no_allow_root_without_the_acknowledgement(tmp_path):
    spawner = make_spawner(tmp_path, two_t4(), args=["--debug"], allow_root_notebooks=False)
    spawner.terminal_shell = []
    spawner.isolated = False
    assert spawner.get_args() == ["--debug"]


async def test_isolation_required_but_not_root(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    spawner = make_spawner(tmp_path, two_t4(), isolate_users=True)
    with pytest.raises(web.HTTPError, match="not root"):
        await spawner._should_isolate()


async def test_auto_refuses_a_hub_that_is_not_root(tmp_path, monkeypatch):
    # issue 10: "auto" used to run every user's notebook as the hub's own user, silently
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    spawner = make_spawner(tmp_path, two_t4(), isolate_users="auto")
    with pytest.raises(web.HTTPError) as refused:
        await spawner._should_isolate()
    assert refused.value.status_code == 500
    message = refused.value.jupyterhub_message
    assert "runs as uid 1000, not root" in message
    assert "Run labfleet as root" in message and "spawner.isolate_users: no" in message


async def test_auto_refuses_a_root_hub_whose_python_check_fails(tmp_path, monkeypatch):
    # issue 10: a root hub whose probe failed used to run notebooks as root (--allow-root)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    spawner = make_spawner(tmp_path, two_t4(), isolate_users="auto", allow_root_notebooks=False)
    key = (sys.executable, spawner.uid_base, spawner.gid_base)
    monkeypatch.setitem(LocalGPUSpawner._isolation_probes, key, False)
    monkeypatch.setitem(
        LocalGPUSpawner._isolation_probe_failures, key, "uid 100000 cannot run python (EACCES)"
    )
    with pytest.raises(web.HTTPError) as refused:
        await spawner._should_isolate()
    assert refused.value.status_code == 500
    message = refused.value.jupyterhub_message
    assert "uid 100000 cannot run python (EACCES)" in message
    assert "Nothing runs as root instead" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="the probe drops to another uid")
async def test_real_probe_failure_refuses_the_start(tmp_path, monkeypatch):
    # a Python only root can reach: the probe (as uid_base) fails, the start is refused
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    python = private / "python3"
    python.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(python))
    spawner = make_spawner(
        tmp_path, two_t4(), isolate_users="auto", allow_root_notebooks=False, uid_base=210000
    )
    spawner.apply_selection({"profile": "cpu"})
    with pytest.raises(web.HTTPError) as refused:
        await spawner.start()
    assert "uid 210000 cannot run" in refused.value.jupyterhub_message
    assert spawner.devices == [] and spawner.proc is None


async def test_no_runs_as_the_hub_user(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    spawner = make_spawner(tmp_path, two_t4(), isolate_users=False, allow_root_notebooks=False)
    assert await spawner._should_isolate() is False


async def test_no_on_a_root_hub_needs_the_acknowledgement(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    spawner = make_spawner(tmp_path, two_t4(), isolate_users=False, allow_root_notebooks=False)
    with pytest.raises(web.HTTPError) as refused:
        await spawner._should_isolate()
    assert "spawner.allow_root_notebooks: true" in refused.value.jupyterhub_message
    spawner.allow_root_notebooks = True
    assert await spawner._should_isolate() is False


async def test_overlapping_id_ranges_refuse_the_start(tmp_path):
    spawner = make_spawner(tmp_path, two_t4(), uid_base=300000, gid_base=300000)
    spawner.apply_selection({"profile": "cpu"})
    with pytest.raises(web.HTTPError) as refused:
        await spawner.start()
    assert refused.value.status_code == 500
    assert "cannot prepare your storage" in refused.value.jupyterhub_message
    assert spawner.proc is None


async def test_move_certs_into_the_home(tmp_path):
    spawner = make_spawner(tmp_path, two_t4())
    certs = tmp_path / "hub-certs"
    certs.mkdir()
    paths = {}
    for key in ("keyfile", "certfile", "cafile"):
        paths[key] = str(certs / f"{key}.pem")
        Path(paths[key]).write_text(key)
    moved = await spawner.move_certs(paths)
    target = tmp_path / "srv" / "home" / "alice" / ".jupyterhub" / "jupyterhub-certs"
    assert moved == {key: str(target / f"{key}.pem") for key in paths}
    assert Path(moved["keyfile"]).read_text() == "keyfile"
    assert not Path(paths["keyfile"]).exists() and Path(paths["cafile"]).exists()


# -- certificates into a home the user can change, as root --------------------------

ALICE_UID = 200001  # uid_base + alice's hub id


def hub_certs(tmp_path) -> dict[str, str]:
    certs = tmp_path / "hub-certs"
    certs.mkdir(exist_ok=True)
    paths = {}
    for key in ("keyfile", "certfile", "cafile"):
        paths[key] = str(certs / f"{key}.pem")
        Path(paths[key]).write_text(key)
    return paths


def roots_folder(tmp_path) -> tuple[Path, tuple]:
    """An /etc-like folder of root's and what must stay as it is: owner, mode, contents."""
    etc = tmp_path / "etc"
    etc.mkdir()
    os.chmod(etc, 0o755)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(etc / "passwd", 0o644)
    return etc, state_of(etc)


def state_of(etc: Path) -> tuple:
    entries = []
    for path in (etc, *sorted(etc.iterdir())):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        entries.append((path.name, st.st_uid, st.st_gid, st.st_mode, content))
    return tuple(entries)


async def isolated_spawner(tmp_path) -> LocalGPUSpawner:
    spawner = make_spawner(tmp_path, two_t4())
    spawner.isolated = True  # what a root hub decides; no process is started here
    await spawner._prepare()
    return spawner


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the user's uid needs root")
async def test_certs_belong_to_the_user_when_isolated(tmp_path):
    spawner = await isolated_spawner(tmp_path)
    moved = await spawner.move_certs(hub_certs(tmp_path))
    certs = spawner.storage.home / ".jupyterhub" / "jupyterhub-certs"
    for path in (certs.parent, certs, *map(Path, moved.values())):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (ALICE_UID, ALICE_UID), path
    assert oct(certs.stat().st_mode & 0o777) == "0o700"
    assert oct(Path(moved["keyfile"]).stat().st_mode & 0o777) == "0o600"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the user's uid needs root")
@pytest.mark.parametrize("linked", [".jupyterhub", ".jupyterhub/jupyterhub-certs"])
async def test_a_linked_certs_folder_is_refused_and_its_target_untouched(tmp_path, linked):
    """The user made ~/.jupyterhub (or the certificates' folder) a link to root's folder."""
    etc, before = roots_folder(tmp_path)
    spawner = await isolated_spawner(tmp_path)
    link = spawner.storage.home / linked
    link.parent.mkdir(exist_ok=True)
    os.chown(link.parent, ALICE_UID, ALICE_UID)
    link.symlink_to(etc)
    os.lchown(link, ALICE_UID, ALICE_UID)
    paths = hub_certs(tmp_path)
    with pytest.raises(web.HTTPError) as refused:
        await spawner.move_certs(paths)
    assert refused.value.status_code == 500
    message = refused.value.jupyterhub_message
    assert "certificates" in message and "symbolic link" in message, message
    assert state_of(etc) == before, "root's folder keeps its owner, mode and contents"
    assert all(Path(p).exists() for p in paths.values()), "the hub's certificates are kept"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the user's uid needs root")
async def test_links_planted_as_certificate_names_are_replaced_not_followed(tmp_path):
    """Links and a hard link to root's files in the certificates' folder: never written."""
    etc, before = roots_folder(tmp_path)
    spawner = await isolated_spawner(tmp_path)
    certs = spawner.storage.home / ".jupyterhub" / "jupyterhub-certs"
    certs.mkdir(parents=True)
    for path in (certs.parent, certs):
        os.chown(path, ALICE_UID, ALICE_UID)
    (certs / "keyfile.pem").symlink_to(etc / "passwd")
    (certs / "certfile.pem").symlink_to(etc)
    os.link(etc / "passwd", certs / "cafile.pem")  # what fs.protected_hardlinks=0 allows
    moved = await spawner.move_certs(hub_certs(tmp_path))
    assert state_of(etc) == before
    for key, path in moved.items():
        st = Path(path).lstat()
        assert st.st_nlink == 1 and (st.st_uid, st.st_mode & 0o777) == (ALICE_UID, 0o600)
        assert Path(path).read_text() == key


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the user's uid needs root")
async def test_a_certs_folder_of_someone_else_is_refused(tmp_path):
    """A folder the user cannot have made (root's) in their home: not written into."""
    spawner = await isolated_spawner(tmp_path)
    dot = spawner.storage.home / ".jupyterhub"
    dot.mkdir()  # root's
    with pytest.raises(web.HTTPError, match="belongs to uid 0"):
        await spawner.move_certs(hub_certs(tmp_path))
    assert os.listdir(dot) == []


# -- claims shared with the local batch service ---------------------------------------

T4_UUID = "GPU-t4t4t4t4-0000-0000-0000-000000000000"
ONLY_T4_REFUSAL = (
    "no NVIDIA Tesla T4 (16 GB) is free: 1 in total, all in use; try another profile or later"
)


def one_t4_machine():
    return FakeNvml([{"name": "Tesla T4", "uuid": T4_UUID}])


def batch_side(fake, claims) -> DeviceAllocator:
    """The batch service's allocator: its own NVML discovery, the same registry."""
    return DeviceAllocator.from_discovery(discover(fake), claims_path=claims, component="batch")


async def test_refused_when_the_batch_service_holds_the_only_device(tmp_path):
    fake, claims = one_t4_machine(), str(tmp_path / "device-claims.json")
    batch = batch_side(fake, claims)
    batch.allocate("batch:ml/train-x1y2", CATALOGUE.accelerators["t4"])
    spawner = make_spawner(
        tmp_path, nvml_module=fake, device_claims_path=claims, cmd=["/bin/false-never-run"]
    )
    assert spawner.availability()["t4"] == (0, 1), "the form counts the job's T4 as taken"
    spawner.apply_selection({"profile": "gpu-t4"})
    with pytest.raises(web.HTTPError) as refused:
        await spawner.start()
    assert refused.value.status_code == 503
    assert refused.value.jupyterhub_message == ONLY_T4_REFUSAL
    assert spawner.proc is None and spawner.devices == []
    assert batch.owner_of(T4_UUID) == "batch:ml/train-x1y2"
    assert not (tmp_path / "srv").exists(), "no storage prepared for a refused start"
    # once the job is over, the notebook gets it, and then the batch service cannot
    batch.release("batch:ml/train-x1y2")
    assert spawner.availability()["t4"] == (1, 1)
    spawner.devices = spawner.allocator.allocate(
        spawner.device_owner, spawner.selection.accelerator
    )
    assert batch.owner_of(T4_UUID) == "alice/" and batch.free_and_total(
        CATALOGUE.accelerators["t4"]
    ) == (0, 1)
    spawner.clear_state()
    assert batch.owner_of(T4_UUID) is None


def test_hub_restart_drops_only_its_own_stale_claims(tmp_path, caplog):
    fake, claims = mixed_machine(), str(tmp_path / "device-claims.json")
    t4 = CATALOGUE.accelerators["t4"]
    before = make_spawner(tmp_path, nvml_module=fake, device_claims_path=claims).allocator
    running = before.allocate("alice/", t4)  # alice's server survives the restart
    before.allocate("bob/", t4)  # bob's start was cut short by the crash
    batch = batch_side(fake, claims)
    batch.allocate("batch:ml/train-x1y2", CATALOGUE.accelerators["rtx5000"])

    LocalGPUSpawner.use_allocator(None)  # the hub restarts: a new process-wide allocator
    alice = make_spawner(tmp_path, nvml_module=fake, device_claims_path=claims)
    alice.load_state({"pid": 4242, "labfleet_devices": [d.uuid for d in running]})
    assert alice.devices == running
    assert alice.allocator is not before
    assert alice.allocator.owner_of("GPU-t4t4t4t4-0000-0000-0000-000000000001") == "bob/"
    # the first hand-out question (here the spawn form) reconciles, once
    availability = make_spawner(tmp_path, user=fake_user("carol", 3)).availability()
    assert availability["t4"] == (1, 2) and availability["rtx5000"] == (0, 1)
    allocator = alice.allocator
    assert allocator.owner_of(running[0].uuid) == "alice/"
    assert allocator.owner_of("GPU-t4t4t4t4-0000-0000-0000-000000000001") is None
    assert batch.held_by("batch:ml/train-x1y2") != [], "the batch service's claim stays"
    stale = [r.getMessage() for r in caplog.records if "stale device claim" in r.getMessage()]
    assert stale == [
        "Dropped stale device claim: GPU-t4t4t4t4-0000-0000-0000-000000000001 was held by "
        "bob/, which this hub no longer runs"
    ]


async def test_restarted_hub_reconciles_once_every_server_is_restored(tmp_path):
    fake, claims = one_t4_machine(), str(tmp_path / "device-claims.json")
    stale = DeviceAllocator.from_discovery(
        discover(fake), claims_path=claims, component="notebooks"
    )
    stale.allocate("bob/", CATALOGUE.accelerators["t4"])
    # JupyterHub loads every running server's state before its first await
    spawner = make_spawner(tmp_path, nvml_module=fake, device_claims_path=claims)
    spawner.load_state({"pid": 4242})
    assert spawner.allocator.owner_of(T4_UUID) == "bob/"
    await asyncio.sleep(0)  # ... and then the scheduled reconcile runs, without any spawn
    assert spawner.allocator.reconciled and spawner.allocator.owner_of(T4_UUID) is None


async def test_corrupt_claims_registry(tmp_path, caplog):
    fake, claims = one_t4_machine(), tmp_path / "device-claims.json"
    claims.write_text("{garbage")
    spawner = make_spawner(
        tmp_path, nvml_module=fake, device_claims_path=str(claims), cmd=["/bin/false-never-run"]
    )
    # servers keep their recorded devices (a start after the repair claims them again)
    spawner.load_state({"pid": 4242, "labfleet_devices": [T4_UUID]})
    assert [d.uuid for d in spawner.devices] == [T4_UUID]
    assert spawner.get_state()["labfleet_devices"] == [T4_UUID]
    # the form still renders, with nothing free; a GPU start is refused with the reason
    assert spawner.availability()["t4"] == (0, 1)
    spawner.clear_state()  # a stop goes on, the claim question waits for the repair
    assert spawner.devices == []
    spawner.apply_selection({"profile": "gpu-t4"})
    with pytest.raises(web.HTTPError) as refused:
        await spawner.start()
    assert refused.value.status_code == 503
    message = refused.value.jupyterhub_message
    assert f"the device claims registry {claims} is unusable" in message
    assert message.endswith("an administrator must repair or remove it")
    assert claims.read_text() == "{garbage"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(m.startswith("Spawn form shows no accelerator free") for m in errors)
    assert any(m.startswith("Cannot release devices of") for m in errors)
    # repaired (removed): hand-out works again
    claims.unlink()
    assert spawner.availability()["t4"] == (1, 1)
