"""A hub run outside the cluster in Kubernetes mode (``labfleet up`` against the test
cluster's real node): ``hub.connect_ip``, ``spawner.kubernetes.storage_path``,
``node_selector`` and ``tolerations``. No cluster: configuration and pod manifests."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from labfleet_hub.configurer import (
    apply_config,
    ensure_secrets,
    hub_bind_ip,
    load_values,
    notebook_batch_url,
    with_secrets,
)
from tornado import web
from traitlets.config import Config

from tests.unit.test_kube_spawner import (  # noqa: F401  (autouse fixtures)
    _stop_watches,
    dummy_kubeconfig,
    make_spawner,
    manifest,
)

ROOT = Path(__file__).resolve().parents[2]
PLACEMENT = {
    "node_selector": {"labfleet.io/real-node": "true"},
    "tolerations": [
        {
            "key": "labfleet.io/real-node",
            "operator": "Equal",
            "value": "true",
            "effect": "NoSchedule",
        }
    ],
}


@pytest.fixture
def config_dir(tmp_path):
    for name in ("labfleet.yaml", "catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    return tmp_path


def values_for(config_dir, hub: dict | None = None, kube: dict | None = None) -> dict:
    path = config_dir / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    data["hub"]["state_dir"] = "state"
    data["hub"].update(hub or {})
    data["spawner"].update(kind="kubernetes", namespace="notebooks", kubernetes=kube or {})
    path.write_text(yaml.safe_dump(data))
    values = load_values(path)
    ensure_secrets(values)
    return with_secrets(values)


def batch_service(c) -> dict:
    return next(s for s in c.JupyterHub.services.get_value([]) if s["name"] == "batch")


def test_without_connect_ip_everything_stays_on_loopback(config_dir):
    values = values_for(config_dir)
    assert hub_bind_ip(values) == "127.0.0.1"
    c = Config()
    apply_config(values, c)
    assert c.JupyterHub.hub_ip == "127.0.0.1"
    assert batch_service(c)["url"] == f"http://127.0.0.1:{values['batch']['port']}"
    # notebooks go through the proxy, like a browser
    assert c.Spawner.environment["LABFLEET_BATCH_URL"] == (
        f"{values['hub']['public_url']}/services/batch/"
    )


def test_connect_ip_moves_the_hub_api_and_the_batch_service_where_pods_reach(config_dir):
    # a loopback alias stands in for the bridge address: the port is really bound there
    values = values_for(config_dir, hub={"connect_ip": "127.0.0.7", "base_url": "/lab/"})
    assert hub_bind_ip(values) == "127.0.0.7"
    c = Config()
    apply_config(values, c)
    port = values["batch"]["port"]
    assert c.JupyterHub.hub_ip == "127.0.0.7"
    assert batch_service(c)["url"] == f"http://127.0.0.7:{port}"
    # notebooks call the service directly, under the prefix the proxy would forward
    url = f"http://127.0.0.7:{port}/lab/services/batch/"
    assert notebook_batch_url(values) == url
    assert c.Spawner.environment["LABFLEET_BATCH_URL"] == url
    # the browser side does not move: the proxy and the devidp stay on loopback
    assert c.JupyterHub.ip == "127.0.0.1"
    assert values["hub"]["public_url"].startswith("http://127.0.0.1:")


async def test_kubernetes_placement_and_storage_path_reach_the_spawner(config_dir, tmp_path):
    values = values_for(config_dir, kube={"storage_path": str(tmp_path / "tree"), **PLACEMENT})
    c = Config()
    apply_config(values, c)
    s = c.PlatformKubeSpawner
    assert s.storage_path == str(tmp_path / "tree")
    assert s.node_selector == PLACEMENT["node_selector"]
    assert s.tolerations == PLACEMENT["tolerations"]
    spawner = make_spawner(config=c)
    assert spawner.storage_path == str(tmp_path / "tree")


async def test_pod_gets_the_configured_placement_besides_labfleet_s(config_dir):
    values = values_for(config_dir, kube=PLACEMENT)
    c = Config()
    apply_config(values, c)
    spawner = make_spawner(config=c, namespace="labfleet")
    pod = await manifest(spawner, {"profile": "cpu", "image": "scipy", "size": "small"})
    assert pod["spec"]["nodeSelector"] == PLACEMENT["node_selector"]
    assert PLACEMENT["tolerations"][0] in pod["spec"]["tolerations"]
    # a second start does not pile the admin's toleration up
    pod = await manifest(spawner, {"profile": "cpu", "image": "scipy", "size": "small"})
    assert pod["spec"]["tolerations"].count(PLACEMENT["tolerations"][0]) == 1


async def test_storage_path_lays_out_the_user_s_folders_before_the_pod(tmp_path):
    tree = tmp_path / "tree"
    owners = []

    def chown(fd, uid, gid):
        owners.append((os.readlink(f"/proc/self/fd/{fd}"), uid, gid))

    spawner = make_spawner(storage_path=str(tree))
    laid_out = []

    async def prepare(layout):
        laid_out.append(layout)
        from labfleet_spawner.storage import apply_storage

        apply_storage(layout, as_root=True, owner_uid=0, chown=chown)

    spawner.prepare_storage = prepare
    pod = await manifest(spawner, {"profile": "cpu", "image": "scipy", "size": "small"})
    [layout] = laid_out
    uid = pod["spec"]["securityContext"]["runAsUser"]
    gids = pod["spec"]["securityContext"]["supplementalGroups"]
    assert (layout.uid, layout.gid) == (uid, uid)
    assert sorted(layout.group_gids.values()) == sorted(gids)
    modes = {
        "home/alice": 0o700,
        "groups/ml": 0o2770,
        "groups/users": 0o2770,
        "public": 0o1777,
        "envs": 0o755,
    }
    for rel, mode in modes.items():
        assert stat.S_IMODE((tree / rel).stat().st_mode) == mode, rel
    owned = {Path(p).relative_to(tree).as_posix(): (u, g) for p, u, g in owners}
    assert owned["home/alice"] == (uid, uid)
    assert owned["groups/ml"] == (0, layout.group_gids["ml"])
    # the pod mounts exactly those folders
    subpaths = {m.get("subPath") for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {"home/alice", "groups/ml", "groups/users", "public", "envs"} <= subpaths


async def test_storage_path_must_be_absolute():
    spawner = make_spawner(storage_path="relative/tree")
    with pytest.raises(web.HTTPError) as err:
        await manifest(spawner, {"profile": "cpu", "image": "scipy", "size": "small"})
    assert err.value.status_code == 500
    assert "must be an absolute path" in str(err.value)


async def test_without_storage_path_nothing_is_made(tmp_path):
    spawner = make_spawner()
    called = []

    async def prepare(layout):
        called.append(layout)

    spawner.prepare_storage = prepare
    await manifest(spawner, {"profile": "cpu", "image": "scipy", "size": "small"})
    assert called == []


def test_images_terminal_config_keeps_the_notebook_path(tmp_path, monkeypatch):
    """What the notebook images write at build time (their server starts with no arguments,
    so the single-node ``--ServerApp.terminado_settings`` argument cannot carry it)."""
    import json

    from labfleet_spawner import terminal

    (tmp_path / "jupyter_server_config.json").write_text('{"ServerApp": {"ip": "x"}}')
    path = terminal.write_server_config(tmp_path, bash="/bin/bash")
    # the file jupyter-server reads in a configuration folder, what was there kept
    assert path == tmp_path / "jupyter_server_config.json"
    data = json.loads(path.read_text())
    assert data == {
        "ServerApp": {
            "ip": "x",
            "terminado_settings": {
                "shell_command": ["/bin/bash", "--init-file", str(terminal.PROFILE), "-i"]
            },
        }
    }
    # the same command the single-node spawner passes as an argument
    arg = terminal.server_arg(terminal.shell_command("/bin/bash"))
    assert arg.endswith(json.dumps(data["ServerApp"]["terminado_settings"]["shell_command"]))
    # what a real jupyter-server makes of that folder
    from jupyter_server.serverapp import ServerApp

    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(tmp_path))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "user"))
    app = ServerApp()
    app.load_config_file()
    assert app.terminado_settings["shell_command"][1:] == [
        "--init-file",
        str(terminal.PROFILE),
        "-i",
    ]
    assert terminal.main([str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "jupyter_server_config.json").is_file()
    assert terminal.main([]) == 2
