"""Reports over the real databases: PostgreSQL sums integers as numeric (Decimal).

Found by benchmarks/accounting.py --report-intervals on PostgreSQL: ``summarize``
added those Decimals to floats and raised TypeError, so every report (and the
GPU-hour budget check) failed on PostgreSQL.
"""

from __future__ import annotations

import pytest
from labfleet_accounting.authz import Forbidden, Identity, scope_for
from labfleet_accounting.budgets import BudgetChecker
from labfleet_accounting.records import Usage
from labfleet_accounting.reports import (
    Weights,
    describe_interval,
    parse_period,
    query_recent,
    query_usage,
    summarize,
)

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


def test_recent_intervals_newest_first_and_only_what_the_viewer_may_see(ledger, engine):
    """query_recent under the report's own scope (authz.scope_for), on both databases."""
    t, end = MARCH
    hour = 3600
    mine = [  # alice's, in the order they started
        Usage("local", "alice/", t - hour, "alice", "ml", "interactive", profile="cpu", cpu=1.0),
        Usage("local-batch", "ml/train-abcdefgh", t + hour, "alice", "ml", "batch",
              profile="a100", accelerator="a100", accelerator_kind="gpu", accelerator_count=2,
              cpu=8.0, name="train-abcdefgh"),
        Usage("k8s", "pod-uid-1", t + 2 * hour, "alice", "ml", "batch", name="sweep-x1-3-b2c4d",
              accelerator="mig-1g.10gb", accelerator_kind="mig", accelerator_count=1,
              gpu_fraction=0.125),
        Usage("local", "alice/gpu", t + 5 * hour, "alice", "cms", "interactive", name="gpu"),
    ]  # fmt: skip
    for usage in mine[:3]:
        ledger.stop(usage, usage.start + 2 * hour)
    ledger.start(mine[3])  # still running
    # bob's: one in the same second as one of alice's, in her group ml
    ledger.stop(Usage("local", "bob/", t + 2 * hour, "bob", "ml", "interactive"), t + 3 * hour)
    ledger.stop(
        Usage("local", "bob/cms", t + 3 * hour, "bob", "cms", "interactive", name="cms"),
        t + 4 * hour,
    )
    # outside March: February, April
    ledger.stop(Usage("local", "alice/", t - 9 * hour, "alice", "ml", "interactive"), t - 5 * hour)
    ledger.stop(Usage("local", "alice/", end, "alice", "ml", "interactive"), end + hour)
    now = t + 6 * hour

    def recent(model, user=None, group=None, limit=50):
        flt = scope_for(Identity.from_model(model), user, group)
        rows = query_recent(engine, t, end, flt, now=now, limit=limit)
        return [describe_interval(r, Weights(), now) for r in rows]

    alice = recent({"name": "alice", "groups": ["ml", "cms"]})
    assert [(e["user"], e["what"]) for e in alice] == [
        ("alice", "gpu"),
        ("alice", "ml/sweep-x1"),
        ("alice", "ml/train-abcdefgh"),
        ("alice", "default server"),  # started in February, ran into March
    ]
    running, kube, job, _ = alice
    assert running["running"] and running["seconds"] == hour and running["group"] == "cms"
    assert (kube["source"], kube["uid"], kube["gpu_hours"]) == ("k8s", "pod-uid-1", 0.25)
    assert (job["gpu_hours"], job["cpu_core_hours"], job["accelerator_count"]) == (4.0, 16.0, 2)
    assert (job["start"], job["end"]) == (t + hour, t + 3 * hour)
    # bob never sees alice's, though they share group ml and a start second
    bob = recent({"name": "bob", "groups": ["ml", "cms"]})
    assert [e["what"] for e in bob] == ["cms", "default server"]
    assert {e["user"] for e in bob} == {"bob"}
    with pytest.raises(Forbidden):
        recent({"name": "bob", "groups": ["ml"]}, user="alice")
    with pytest.raises(Forbidden):
        recent({"name": "bob", "groups": ["ml"]}, group="ml")
    # an admin of ml: ml's, both users, not cms; a tie on the start: the later written first
    ml = recent({"name": "carol", "groups": ["ml-admins"]}, group="ml")
    assert [(e["user"], e["start"]) for e in ml] == [
        ("bob", t + 2 * hour),
        ("alice", t + 2 * hour),
        ("alice", t + hour),
        ("alice", t - hour),
    ]
    # a platform admin: everything in March; at most ``limit``, the newest
    everyone = recent({"name": "root", "admin": True})
    assert len(everyone) == 6 and {e["user"] for e in everyone} == {"alice", "bob"}
    assert [e["start"] for e in everyone] == sorted((e["start"] for e in everyone), reverse=True)
    assert [e["what"] for e in recent({"name": "root", "admin": True}, limit=2)] == ["gpu", "cms"]
    assert recent({"name": "root", "admin": True}, limit=0) == []
