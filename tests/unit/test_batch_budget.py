"""The batch service's GPU-hour budget gate over labfleet_accounting.budgets."""

from __future__ import annotations

import asyncio

import pytest
from labfleet_accounting.budgets import ALLOW, REFUSE, WARN, BudgetChecker, Decision
from labfleet_accounting.db import make_engine, upgrade
from labfleet_batch.budget import BudgetGate, BudgetUnavailable


class Counting:
    def __init__(self, decision=None, error=None):
        self.calls, self.decision, self.error = [], decision, error

    def check_budget(self, group, kind):
        self.calls.append((group, kind))
        if self.error:
            raise self.error
        return self.decision


@pytest.fixture
def checker(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'accounting.sqlite'}")
    upgrade(engine)
    return BudgetChecker(engine)


def test_spent_budget_refuses_gpu_with_the_clear_message(checker):
    checker.set_budget("ml", 0)
    decision = asyncio.run(BudgetGate(checker, ttl=0).check("ml", "gpu"))
    assert decision.verdict == REFUSE and not decision.allowed
    assert "group 'ml' has used 0.0 of its 0 GPU-hours this period" in decision.message
    assert "new GPU sessions and jobs are refused" in decision.message


def test_unenforced_budget_warns_and_no_budget_allows(checker):
    checker.set_budget("ml", 0, enforce=False)
    gate = BudgetGate(checker, ttl=0)
    decision = asyncio.run(gate.check("ml", "mig"))
    assert decision.verdict == WARN and decision.allowed and "(not enforced)" in decision.message
    assert asyncio.run(gate.check("cms", "gpu")).verdict == ALLOW


def test_cpu_jobs_are_not_checked_unless_configured():
    assert not BudgetGate(Counting()).applies("")
    assert BudgetGate(Counting()).applies("fpga")
    assert BudgetGate(Counting(), limit_cpu=True).applies("")


def test_decisions_are_cached_per_group_and_kind_for_ttl():
    now = [100.0]
    stub = Counting(Decision(ALLOW, "fine"))
    gate = BudgetGate(stub, ttl=10, clock=lambda: now[0])
    for _ in range(5):
        asyncio.run(gate.check("ml", "gpu"))
    asyncio.run(gate.check("ml", "mig"))
    assert stub.calls == [("ml", "gpu"), ("ml", "mig")]
    now[0] += 10
    asyncio.run(gate.check("ml", "gpu"))
    assert stub.calls[-1] == ("ml", "gpu") and len(stub.calls) == 3


def test_database_errors_refuse_with_a_reason_and_are_not_cached():
    stub = Counting(error=RuntimeError("no such table: budget"))
    gate = BudgetGate(stub)
    for _ in range(2):
        with pytest.raises(BudgetUnavailable, match="group 'ml' cannot be checked right now"):
            asyncio.run(gate.check("ml", "gpu"))
    assert len(stub.calls) == 2
