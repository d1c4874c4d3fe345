"""``labfleet sync-queues --dry-run``: the queue layout as YAML, nothing applied."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from labfleet_hub.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_layout_the_service_expects(tmp_path, capsys):
    for name in ("labfleet.yaml", "catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    # no kubeconfig anywhere: a dry run must not need a cluster
    assert main(["sync-queues", "--config", str(tmp_path / "labfleet.yaml"), "--dry-run"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    # one namespace, LocalQueue and ClusterQueue per configured group
    for group in ("ml", "cms"):
        assert ("Namespace", f"labfleet-{group}") in kinds
        assert ("LocalQueue", f"{group}-queue") in kinds
        assert ("ClusterQueue", f"labfleet-{group}") in kinds
    assert any(kind == "WorkloadPriorityClass" for kind, _ in kinds)


def test_invalid_configuration_is_refused_before_any_cluster_call(tmp_path, capsys):
    for name in ("labfleet.yaml", "catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    path = tmp_path / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    data["batch"]["queues"]["groups"]["ml"]["accelerators"] = {"h100": 1}
    path.write_text(yaml.safe_dump(data))
    assert main(["sync-queues", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "batch.queues" in err and "'h100'" in err
