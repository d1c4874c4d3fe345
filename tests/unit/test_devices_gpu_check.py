"""tools/gpu_check.py against the fake NVML: the logic a GPU machine would run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.unit.test_nvml import FakeNvml, mixed_machine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def echo_child(env):
    return dict(env)


def test_checks_pass_on_a_mixed_machine(gpu_check):
    summary = gpu_check.run(REPO / "config" / "catalogue.yaml", echo_child, mixed_machine())
    assert summary["ok"], summary
    checks = {c["accelerator"]: c for c in summary["checks"]}
    assert set(checks) == {"tesla-t4", "mig-1g-10gb", "mig-3g-40gb", "quadro-rtx-5000"}
    t4 = checks["tesla-t4"]
    assert t4["total"] == 2 and len(t4["alice"]) == 1 and len(t4["bob"]) == 1
    assert (
        t4["refusal"] == "no Tesla T4 is free: 2 in total, all in use; try another profile or later"
    )
    assert "only 1 of 2 are free" in t4["partial_refusal"]
    assert t4["child"]["CUDA_VISIBLE_DEVICES"] == t4["alice"][0]
    assert checks["mig-3g-40gb"]["bob"] == []
    assert summary["catalogue_availability"]["t4"] == [2, 2]
    assert summary["catalogue_availability"]["mig-1g.10gb"] == [2, 2]
    assert summary["gpus"][2]["mig_enabled"] and len(summary["gpus"][2]["mig"]) == 3


def test_a_child_that_sees_other_devices_fails_the_check(gpu_check):
    summary = gpu_check.run(None, lambda env: {"CUDA_VISIBLE_DEVICES": ""}, mixed_machine())
    assert not summary["ok"]
    assert any("the child saw" in f for c in summary["checks"] for f in c["failures"])


def test_no_gpu_is_a_clear_success(gpu_check):
    fake = FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound("missing"))
    summary = gpu_check.run(None, echo_child, fake)
    assert summary["ok"] and summary["message"].startswith("no GPU to check: the NVML library")


def test_real_child_process_reports_its_environment(gpu_check):
    seen = gpu_check._run_child(
        {"CUDA_VISIBLE_DEVICES": "GPU-x", "NVIDIA_VISIBLE_DEVICES": "GPU-x"}
    )
    assert seen["CUDA_VISIBLE_DEVICES"] == "GPU-x"


def test_main_without_gpu_exits_zero(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(
        gpu_check, "run", lambda path: {"ok": True, "message": "no GPU to check: test"}
    )
    assert gpu_check.main([]) == 0
    assert "no GPU to check: test" in capsys.readouterr().err
