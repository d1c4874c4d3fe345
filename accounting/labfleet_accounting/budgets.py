"""GPU-hour budgets per group and calendar period: the decision spawners and batch ask for.

:func:`decide` is pure: used GPU-hours and a budget in, a :class:`Decision`
out. :class:`BudgetChecker` adds the two reads (the group's budget row and
its GPU-hours so far this period). CPU-only requests are always allowed
unless ``limit_cpu`` says otherwise: budgets are about accelerators.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from sqlalchemy import Engine, select

from .models import Budget
from .reports import Filter, Weights, period_of, query_usage, summarize

ALLOW, WARN, REFUSE = "allow", "warn", "refuse"


@dataclass(frozen=True)
class Decision:
    verdict: str  # allow, warn, refuse
    message: str
    used_gpu_hours: float = 0.0
    budget_gpu_hours: float | None = None
    period_start: int = 0
    period_end: int = 0

    @property
    def allowed(self) -> bool:
        return self.verdict != REFUSE

    def as_dict(self) -> dict:
        return {**asdict(self), "allowed": self.allowed}


def decide(
    group: str,
    accelerator_kind: str,
    used: float,
    budget: float | None,
    warn_fraction: float = 0.8,
    enforce: bool = True,
    limit_cpu: bool = False,
    period: tuple[int, int] = (0, 0),
) -> Decision:
    """Allow, warn at ``warn_fraction`` of the budget, refuse at 100% (when ``enforce``)."""
    base = {"used_gpu_hours": round(used, 3), "budget_gpu_hours": budget}
    base.update(period_start=period[0], period_end=period[1])
    if budget is None:
        return Decision(ALLOW, f"group {group!r} has no GPU-hour budget", **base)
    if not accelerator_kind and not limit_cpu:
        return Decision(ALLOW, "CPU-only sessions are not limited by the GPU budget", **base)
    share = used / budget if budget > 0 else float("inf")
    if share >= 1:
        message = (
            f"group {group!r} has used {used:.1f} of its {budget:g} GPU-hours this period; "
            "new GPU sessions and jobs are refused until the next period or until a "
            "platform admin raises the budget"
        )
        if enforce:
            return Decision(REFUSE, message, **base)
        return Decision(WARN, message + " (not enforced)", **base)
    if share >= warn_fraction:
        return Decision(
            WARN,
            f"group {group!r} has used {share:.0%} of its {budget:g} GPU-hours this period",
            **base,
        )
    return Decision(ALLOW, f"group {group!r} has used {share:.0%} of its GPU-hour budget", **base)


class BudgetChecker:
    """``check_budget(group, accelerator) -> Decision`` over a ledger database."""

    def __init__(
        self, engine: Engine, weights: Weights | None = None, limit_cpu=False, clock=time.time
    ):
        self.engine = engine
        self.weights = weights or Weights()
        self.limit_cpu = limit_cpu
        self.clock = clock

    def budget(self, group: str) -> Budget | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(Budget).where(Budget.group_name == group)).first()
        return row

    def set_budget(self, group, gpu_hours, period="month", warn_fraction=0.8, enforce=True):
        from .ledger import _insert

        insert = _insert(self.engine.dialect.name)
        values = dict(
            group_name=group, gpu_hours=float(gpu_hours), period=period,
            warn_fraction=float(warn_fraction), enforce=bool(enforce),
        )  # fmt: skip
        stmt = insert(Budget).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["group_name"], set_=values)
        with self.engine.begin() as connection:
            connection.execute(stmt)

    def used(self, group: str, start: int, end: int, now: int) -> float:
        rows = query_usage(self.engine, start, end, Filter(groups=(group,)), now)
        summary = summarize(rows, "group", self.weights)
        return summary.get(group, {}).get("total", {}).get("gpu_hours_total", 0.0)

    def check_budget(self, group: str, accelerator_kind: str) -> Decision:
        now = int(self.clock())
        row = self.budget(group)
        if row is None:
            return decide(group, accelerator_kind, 0.0, None)
        period = period_of(row.period, now)
        used = self.used(group, period[0], period[1], now)
        return decide(
            group, accelerator_kind, used, row.gpu_hours, row.warn_fraction, row.enforce,
            self.limit_cpu, period,
        )  # fmt: skip
