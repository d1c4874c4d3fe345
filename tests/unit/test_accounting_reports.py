"""Reports, authorization, budgets and metrics: pure logic, and the SQL on SQLite in tmp."""

from __future__ import annotations

import pytest
from labfleet_accounting import db
from labfleet_accounting.authz import Forbidden, Identity, may_manage_group, scope_for
from labfleet_accounting.budgets import ALLOW, REFUSE, WARN, BudgetChecker, decide
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.metrics import LedgerMetrics
from labfleet_accounting.records import Usage
from labfleet_accounting.reports import (
    Filter,
    PeriodError,
    Weights,
    parse_period,
    period_of,
    query_series,
    query_usage,
    series_svg,
    summarize,
    to_csv,
)
from prometheus_client import CollectorRegistry, generate_latest

MARCH = parse_period("2025-03")
H = 3600


def test_periods():
    assert MARCH[1] - MARCH[0] == 31 * 86400
    assert parse_period("2025-Q4")[1] == parse_period("2026")[0]
    assert parse_period("2024")[1] - parse_period("2024")[0] == 366 * 86400
    assert parse_period("2025-03-02") == (MARCH[0] + 86400, MARCH[0] + 2 * 86400)
    assert period_of("quarter", MARCH[0] + 5) == parse_period("2025-Q1")
    for bad in ("2025-13", "2025-Q5", "March", ""):
        with pytest.raises(PeriodError, match="YYYY-MM"):
            parse_period(bad)


@pytest.fixture
def ledger(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    db.upgrade(engine)
    return Ledger(engine, clock=lambda: MARCH[0] + 20 * 86400)


def u(uid, start, user="alice", group="ml", kind="batch", **kw):
    return Usage("k8s", uid, start, user, group, kind, **kw)


def fill(ledger):
    t = MARCH[0]
    # Two A100s for 2 h, straddling the start of March: only 1 h counts in March.
    ledger.stop(u("a", t - H, accelerator="a100", accelerator_kind="gpu", accelerator_count=2,
                  cpu=4, memory=8 * 10**9), t + H)  # fmt: skip
    # One 1g MIG slice (1/7 GPU) for 7 h, interactive.
    ledger.stop(u("b", t, kind="interactive", accelerator="a100-1g", accelerator_kind="mig",
                  accelerator_count=1, gpu_fraction=1 / 7, cpu=1), t + 7 * H)  # fmt: skip
    # FPGA for 3 h, another user and group.
    ledger.stop(u("c", t, user="bob", group="cms", accelerator="u55c", accelerator_kind="fpga",
                  accelerator_count=1, cpu=2), t + 3 * H)  # fmt: skip
    # Still running: counts up to "now" (day 20).
    ledger.start(u("d", t + 19 * 86400, user="bob", group="cms", cpu=1))


def test_usage_report_clips_to_the_period_and_weights_mig(ledger):
    fill(ledger)
    rows = query_usage(ledger.engine, *MARCH, now=MARCH[0] + 20 * 86400)
    by_user = summarize(rows, "user")
    alice = by_user["alice"]
    assert alice["batch"]["gpu_hours"] == {"a100": 2.0}  # 1 h x 2 GPUs inside March
    assert alice["interactive"]["gpu_hours"] == {"a100-1g": pytest.approx(1.0)}  # 7 h x 1/7
    assert alice["total"]["gpu_hours_total"] == pytest.approx(3.0)
    assert alice["batch"]["cpu_core_hours"] == 4.0 and alice["batch"]["memory_gb_hours"] == 8.0
    bob = by_user["bob"]
    assert bob["batch"]["fpga_hours"] == {"u55c": 3.0}
    assert bob["batch"]["cpu_core_hours"] == pytest.approx(6 + 24)  # FPGA job + 24 h running
    whole = summarize(rows, "user", Weights(mig="whole"))
    assert whole["alice"]["interactive"]["gpu_hours"] == {"a100-1g": 7.0}
    custom = summarize(rows, "group", Weights(overrides={"a100-1g": 0.5, "a100": 2}))
    assert custom["ml"]["total"]["gpu_hours"] == {"a100": 4.0, "a100-1g": 3.5}
    only_bob = query_usage(ledger.engine, *MARCH, Filter(users=("bob",)), MARCH[0] + 20 * 86400)
    assert {r["user_name"] for r in only_bob} == {"bob"}


def test_csv_and_series_and_svg(ledger):
    fill(ledger)
    summary = summarize(query_usage(ledger.engine, *MARCH, now=MARCH[1]), "group")
    lines = to_csv(summary, "group").splitlines()
    assert lines[0] == "group,kind,resource,model,hours"
    assert "ml,batch,gpu,a100,2.0" in lines and "cms,batch,fpga,u55c,3.0" in lines
    series = query_series(ledger.engine, MARCH[0], MARCH[0] + 3 * 86400, 86400, now=MARCH[1])
    assert [p["gpu_hours_batch"] for p in series] == [2.0, 0.0, 0.0]
    assert series[0]["gpu_hours_interactive"] == pytest.approx(1.0)
    svg = series_svg(series)
    assert svg.startswith("<svg") and svg.count('class="batch"') == 3 and "<script" not in svg
    with pytest.raises(PeriodError, match="400 buckets"):
        query_series(ledger.engine, *MARCH, 60)


def test_identity_and_scopes():
    alice = Identity.from_model({"name": "alice", "groups": ["ml", "ml-admins"]})
    bob = Identity.from_model({"name": "bob", "groups": ["cms"]}, group_admins={"cms": ["bob"]})
    eve = Identity.from_model({"name": "eve", "groups": ["ml"]})
    root = Identity.from_model({"name": "root", "admin": True})
    assert alice.administers == {"ml"} and bob.administers == {"cms"} and not eve.administers
    assert scope_for(eve, None, None) == Filter(users=("eve",))
    assert scope_for(eve, "eve", "ml") == Filter(users=("eve",), groups=("ml",))
    assert scope_for(alice, None, "ml") == Filter(groups=("ml",))
    assert scope_for(alice, "eve", "ml") == Filter(users=("eve",), groups=("ml",))
    assert scope_for(root, None, None) == Filter()
    for who, user, group in ((eve, "alice", None), (eve, None, "ml"), (alice, None, "cms"),
                             (alice, "bob", None)):  # fmt: skip
        with pytest.raises(Forbidden, match="you may see your own usage"):
            scope_for(who, user, group)
    assert may_manage_group(alice, "ml") and not may_manage_group(eve, "ml")
    assert may_manage_group(root, "anything")


def test_budget_decisions():
    assert decide("ml", "gpu", 5, None).verdict == ALLOW
    assert decide("ml", "", 500, 100).verdict == ALLOW  # CPU only
    assert decide("ml", "", 500, 100, limit_cpu=True).verdict == REFUSE
    assert decide("ml", "gpu", 79, 100).verdict == ALLOW
    assert decide("ml", "mig", 80, 100).verdict == WARN
    refused = decide("ml", "gpu", 100, 100)
    assert refused.verdict == REFUSE and not refused.allowed
    assert "used 100.0 of its 100 GPU-hours" in refused.message
    assert decide("ml", "gpu", 150, 100, enforce=False).verdict == WARN


def test_budget_checker_over_the_ledger(ledger):
    fill(ledger)
    checker = BudgetChecker(ledger.engine, clock=lambda: MARCH[0] + 20 * 86400)
    assert checker.check_budget("ml", "gpu").verdict == ALLOW  # no budget
    checker.set_budget("ml", 3.5)
    d = checker.check_budget("ml", "gpu")
    assert d.verdict == WARN and d.used_gpu_hours == pytest.approx(3.0)
    checker.set_budget("ml", 3.0)
    assert checker.check_budget("ml", "gpu").verdict == REFUSE
    assert checker.check_budget("ml", "").verdict == ALLOW


def test_metrics_exposition(ledger):
    fill(ledger)
    ledger.start(u("e", MARCH[0] + 19 * 86400, accelerator="a100-1g", accelerator_kind="mig",
                   accelerator_count=2, gpu_fraction=0.125))  # fmt: skip
    registry = CollectorRegistry()
    registry.register(LedgerMetrics(ledger.engine, clock=lambda: MARCH[0] + 20 * 86400))
    text = generate_latest(registry).decode()
    assert 'labfleet_running_sessions{group="cms",kind="batch"} 1.0' in text
    assert (
        'labfleet_allocated_accelerators{accelerator="a100-1g",accelerator_kind="mig",'
        'group="ml",kind="batch"} 2.0' in text
    )
    assert (
        'labfleet_allocated_gpu_equivalents{accelerator="a100-1g",group="ml",kind="batch"} 0.25'
        in text
    )
    # 2 A100 x 2 h (whole interval, not just March) = 14400 device-seconds.
    assert (
        'labfleet_accelerator_seconds_total{accelerator="a100",accelerator_kind="gpu",'
        'group="ml",kind="batch"} 14400.0' in text
    )
    assert "labfleet_cpu_core_seconds_total" in text
