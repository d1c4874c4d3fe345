"""labfleet.yaml -> PlatformKubeSpawner traits (the kubernetes branch of apply_config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from labfleet_hub.configurer import ConfigError, apply_config, ensure_secrets, load_values
from labfleet_hub.configurer import with_secrets as add_secrets
from traitlets.config import Config

from tests.unit.test_kube_spawner import (  # noqa: F401  (autouse fixtures)
    _stop_watches,
    dummy_kubeconfig,
    make_spawner,
)

ROOT = Path(__file__).resolve().parents[2]


def kube_values(config_dir, kube: dict) -> dict:
    path = config_dir / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    data["hub"]["state_dir"] = str(config_dir / "state")
    data["spawner"].update(kind="kubernetes", namespace="notebooks", kubernetes=kube)
    path.write_text(yaml.safe_dump(data))
    values = load_values(path)
    ensure_secrets(values)
    return add_secrets(values)


async def test_kubernetes_branch_sets_spawner_traits(config_dir):
    values = kube_values(
        config_dir,
        {
            "home_storage": "pvc",
            "home_capacity": "20Gi",
            "storage_class": "ceph-rbd",
            "shared_claim": "labfleet-cephfs",
            "envs_writer_group": "admins",
            "uid_base": 500000,
            "gid_base": 600000,
            "unschedulable_grace_period": 45,
            "availability": False,
            "kueue": False,
            "accounting_group_exclude": ["users", "admins"],
        },
    )
    c = Config()
    apply_config(values, c)
    assert c.JupyterHub.spawner_class == "labfleet-kube"
    s = c.PlatformKubeSpawner
    assert s.namespace == "notebooks"
    assert s.home_storage == "pvc" and s.storage_capacity == "20Gi"
    assert s.storage_class == "ceph-rbd"
    assert s.shared_volume == {"persistentVolumeClaim": {"claimName": "labfleet-cephfs"}}
    assert s.envs_writer_group == "admins"
    assert (s.uid_base, s.gid_base) == (500000, 600000)
    assert s.unschedulable_grace_period == 45
    assert s.availability_enabled is False and s.kueue_enabled is False
    assert s.accounting_group_exclude == ["users", "admins"]
    # the values are valid for the spawner's traits
    spawner = make_spawner(config=c)
    assert spawner.home_storage == "pvc" and spawner.envs_writer_group == "admins"
    assert spawner.shared_volume["persistentVolumeClaim"]["claimName"] == "labfleet-cephfs"


async def test_kubernetes_defaults_and_shared_volume(config_dir):
    values = kube_values(config_dir, {"shared_volume": {"nfs": {"server": "nfs", "path": "/x"}}})
    c = Config()
    apply_config(values, c)
    s = c.PlatformKubeSpawner
    assert s.home_storage == "shared"
    assert s.shared_volume == {"nfs": {"server": "nfs", "path": "/x"}}
    assert "unschedulable_grace_period" not in s  # the spawner's default applies
    spawner = make_spawner(config=c)
    assert spawner.unschedulable_grace_period == 120


@pytest.mark.parametrize(
    "kube, field",
    [
        ({"home_storage": "nfs"}, "spawner.kubernetes.home_storage"),
        ({"envs_writer_group": "Bad Group"}, "spawner.kubernetes.envs_writer_group"),
        ({"shared_claim": "Not_A_Name"}, "spawner.kubernetes.shared_claim"),
        ({"unschedulable_grace_period": -1}, "spawner.kubernetes.unschedulable_grace_period"),
        ({"colour": "red"}, "spawner.kubernetes"),
    ],
)
def test_bad_kubernetes_values_name_the_field(config_dir, kube, field):
    with pytest.raises(ConfigError, match=f"field {field}"):
        kube_values(config_dir, kube)
