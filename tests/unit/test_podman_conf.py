"""tools/podman_conf.py: podman's host settings, written only when missing or different."""

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("podman_conf", ROOT / "tools" / "podman_conf.py")
podman_conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(podman_conf)


def settings(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def test_missing_file_is_written_then_left_alone(tmp_path):
    conf = tmp_path / "containers" / "containers.conf"
    assert podman_conf.ensure(conf) == "written"
    data = settings(conf)
    assert data["engine"] == {
        "cgroup_manager": "cgroupfs",
        "events_logger": "file",
        "runtime": "runc",
    }
    assert data["containers"]["default_ulimits"] == ["nofile=20000:20000", "nproc=32768:32768"]
    before = conf.stat().st_mtime_ns
    assert podman_conf.ensure(conf) == "unchanged"
    assert conf.stat().st_mtime_ns == before


def test_other_settings_are_kept(tmp_path):
    conf = tmp_path / "containers.conf"
    conf.write_text(
        "# site settings\n"
        "[containers]\n"
        'log_driver = "k8s-file"\n'
        "default_ulimits = [\n"
        '  "nofile=1024:1024",\n'
        "]\n"
        "\n"
        "[engine]\n"
        'cgroup_manager = "systemd"\n'
        "num_locks = 4096\n"
        "\n"
        "[network]\n"
        'network_backend = "cni"\n'
    )
    assert podman_conf.ensure(conf) == "updated"
    data = settings(conf)
    assert data["containers"] == {
        "log_driver": "k8s-file",
        "default_ulimits": ["nofile=20000:20000", "nproc=32768:32768"],
    }
    assert data["engine"] == {
        "cgroup_manager": "cgroupfs",
        "num_locks": 4096,
        "events_logger": "file",
        "runtime": "runc",
    }
    assert data["network"] == {"network_backend": "cni"}
    assert conf.read_text().startswith("# site settings\n")
    assert podman_conf.ensure(conf) == "unchanged"


def test_missing_table_is_added(tmp_path):
    conf = tmp_path / "containers.conf"
    conf.write_text('[network]\nnetwork_backend = "cni"\n')
    assert podman_conf.ensure(conf) == "updated"
    data = settings(conf)
    assert data["network"] == {"network_backend": "cni"}
    assert data["engine"]["runtime"] == "runc"
