"""GPU-hour budgets before a job is created: ``labfleet_accounting.budgets``, in process.

The batch service asks the accounting database directly (``BudgetChecker``
over ``BatchService.budget_db_url``) rather than the accounting service's
``api/budget/check`` over HTTP: the decision is the same function either way,
the service needs no hub scope for another service, and a submission does not
wait for a second service (the database is a local SQLite file on a single
node; on Kubernetes give the service a read-only PostgreSQL role). The
accounting service owns the schema (its migrations); this side only reads.

Decisions are cached per (group, accelerator kind) for ``ttl`` seconds: a
burst of submissions costs one query, and a month's budget moves by far less
than a job in that time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("labfleet.batch")


class BudgetUnavailable(Exception):
    """The budget could not be read; the message says why (no job is created)."""


class BudgetGate:
    """``await gate.check(group, accelerator_kind) -> Decision`` (cached, off the event loop).

    ``checker`` is anything with ``check_budget(group, accelerator_kind)``
    returning a :class:`labfleet_accounting.budgets.Decision` (injected; tests
    pass a stub or a ``BudgetChecker`` on a throwaway database).
    """

    def __init__(
        self,
        checker: Any,
        limit_cpu: bool = False,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.checker = checker
        self.limit_cpu = limit_cpu
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    def applies(self, accelerator_kind: str) -> bool:
        """CPU-only jobs are not asked about unless ``limit_cpu``: budgets are GPU-hours."""
        return bool(accelerator_kind) or self.limit_cpu

    async def check(self, group: str, accelerator_kind: str):
        key = (group, accelerator_kind)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        try:
            decision = await asyncio.to_thread(self.checker.check_budget, group, accelerator_kind)
        except Exception as e:  # any database error: refuse, never create unchecked
            log.warning("Budget check for %s failed: %s", group, e)
            raise BudgetUnavailable(
                f"the GPU-hour budget of group {group!r} cannot be checked right now "
                f"({type(e).__name__}); try again in a minute or ask a platform admin"
            ) from None
        self._cache[key] = (now, decision)
        return decision


def budget_gate_from_url(url: str, limit_cpu: bool = False, ttl: float = 10.0) -> BudgetGate:
    """A gate over the accounting database at ``url`` (engine created, not connected)."""
    from labfleet_accounting.budgets import BudgetChecker
    from labfleet_accounting.db import make_engine

    return BudgetGate(BudgetChecker(make_engine(url), limit_cpu=limit_cpu), limit_cpu, ttl)
