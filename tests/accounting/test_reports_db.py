"""Reports over the real databases: PostgreSQL sums integers as numeric (Decimal).

Found by benchmarks/accounting.py --report-intervals on PostgreSQL: ``summarize``
added those Decimals to floats and raised TypeError, so every report (and the
GPU-hour budget check) failed on PostgreSQL.
"""

from __future__ import annotations

from labfleet_accounting.budgets import BudgetChecker
from labfleet_accounting.records import Usage
from labfleet_accounting.reports import Weights, parse_period, query_usage, summarize

MARCH = parse_period("2025-03")


def test_reports_and_budget_on_both_databases(ledger, engine):
    t = MARCH[0]
    gpu = Usage("k8s", "p1", t, "alice", "ml", "batch", accelerator="a100",
                accelerator_kind="gpu", accelerator_count=2, cpu=4.0, memory=8 * 10**9)  # fmt: skip
    mig = Usage("k8s", "p2", t + 3600, "bob", "ml", "interactive", accelerator="mig-1g.10gb",
                accelerator_kind="mig", accelerator_count=1, gpu_fraction=0.125,
                cpu=1.0)  # fmt: skip
    ledger.stop(gpu, t + 2 * 3600)
    ledger.stop(mig, t + 3 * 3600)
    rows = query_usage(engine, *MARCH, now=MARCH[1])
    summary = summarize(rows, "group")
    total = summary["ml"]["total"]
    assert total["gpu_hours"] == {"a100": 4.0, "mig-1g.10gb": 0.25}
    assert total["gpu_hours_total"] == 4.25
    assert total["cpu_core_hours"] == 10.0 and total["memory_gb_hours"] == 16.0
    assert total["wall_hours"] == 4.0 and total["intervals"] == 2
    assert summary["ml"]["batch"]["gpu_hours_total"] == 4.0
    checker = BudgetChecker(engine, Weights(), clock=lambda: t + 4 * 3600)
    checker.set_budget("ml", 5.0, "month", 0.8, True)
    decision = checker.check_budget("ml", "gpu")
    assert decision.used_gpu_hours == 4.25 and decision.verdict == "warn"  # 85% of 5
