"""Budgets through the real service: a real hub (HubAuth), the local backend, and the
accounting database the accounting service would own (migrated SQLite)."""

from __future__ import annotations

import pytest
from labfleet_accounting.budgets import BudgetChecker
from labfleet_accounting.db import make_engine, upgrade
from labfleet_batch.budget import BudgetGate
from labfleet_batch.local import LocalBackend
from labfleet_batch.validation import Limits
from labfleet_spawner.devices import DeviceAllocator
from labfleet_spawner.nvml import GpuDevice

from tests.batch.harness import make_context, running_service
from tests.batch.test_batch_local_api import CATALOGUE, groups, qconfig, storage_root, unique

__all__ = ["groups", "qconfig", "storage_root"]  # fixtures shared with the local API tests


@pytest.fixture
def checker(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'accounting.sqlite'}")
    upgrade(engine)
    return BudgetChecker(engine)


@pytest.fixture
async def service(hub, qconfig, storage_root, checker):
    backend = LocalBackend(
        qconfig,
        str(storage_root),
        allocator=DeviceAllocator([GpuDevice(0, "GPU-fake-t4-0", "Tesla T4")]),
        isolate=False,  # jobs as the test's own user, chosen explicitly
        kill_grace=1,
    )
    ctx = make_context(
        backend, CATALOGUE, qconfig, hub, limits=Limits(min_run_time=1),
        budget=BudgetGate(checker, ttl=0),
    )  # fmt: skip
    async with running_service(ctx) as svc:
        yield svc
    await backend.close()


async def test_spent_budget_refuses_gpu_jobs_only(service, hub, groups, checker):
    ml = groups["ml"]
    token = hub.add_user(unique("alice"), [ml])
    checker.set_budget(ml, 0)  # nothing left this period
    r = await service.call("POST", "api/jobs", token, {"command": ["true"], "accelerator": "t4",
                                                       "group": ml})  # fmt: skip
    assert r.status == 403, r.text
    assert f"group '{ml}' has used 0.0 of its 0 GPU-hours this period" in r.body["message"]
    # refused before anything was created
    assert (await service.call("GET", "api/jobs", token)).body["jobs"] == []
    # CPU jobs are not limited by a GPU-hour budget
    r = await service.call("POST", "api/jobs", token, {"command": ["true"], "group": ml})
    assert r.status == 201, r.text
    assert "warning" not in r.body and "budget" not in r.body
    jobs = (await service.call("GET", "api/jobs", token)).body["jobs"]
    assert [j["accelerator"] for j in jobs] == [None]


async def test_warning_at_the_threshold_is_in_the_submit_response(service, hub, groups, checker):
    ml = groups["ml"]
    token = hub.add_user(unique("alice"), [ml])
    checker.set_budget(ml, 0, enforce=False)
    r = await service.call("POST", "api/jobs", token, {"command": ["true"], "accelerator": "t4",
                                                       "group": ml})  # fmt: skip
    assert r.status == 201, r.text
    assert r.body["budget"]["verdict"] == "warn"
    assert "GPU-hours this period" in r.body["warning"] and "(not enforced)" in r.body["warning"]
    # a group without a budget: allowed, no warning
    phy = groups["phy"]
    token2 = hub.add_user(unique("dave"), [phy])
    r = await service.call("POST", "api/jobs", token2, {"command": ["true"], "group": phy})
    assert r.status == 201 and "warning" not in r.body
