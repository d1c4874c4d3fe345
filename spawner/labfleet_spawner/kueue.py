"""Reading Kueue Workloads: pure helpers shared by the spawner and the batch service."""

from __future__ import annotations


def condition_true(obj: dict | None, ctype: str) -> bool:
    """Whether ``obj`` (a Workload) has condition ``ctype`` with status True."""
    return any(
        c.get("type") == ctype and c.get("status") == "True"
        for c in ((obj or {}).get("status") or {}).get("conditions") or []
    )


def pending_in_order(workloads: list[dict], queue_name: str) -> list[dict]:
    """The LocalQueue's Workloads still waiting for quota, in Kueue's order.

    Kueue orders a queue by priority (highest first), then creation time. This
    is the estimate used where the visibility API is not served: it cannot see
    other LocalQueues of the same ClusterQueue, nor workloads that never fit.
    """
    pending = [
        wl
        for wl in workloads
        if (wl.get("spec") or {}).get("queueName") == queue_name
        and not condition_true(wl, "QuotaReserved")
        and not condition_true(wl, "Finished")
    ]
    pending.sort(
        key=lambda wl: (
            -((wl.get("spec") or {}).get("priority") or 0),
            (wl.get("metadata") or {}).get("creationTimestamp") or "",
            (wl.get("metadata") or {}).get("name") or "",
        )
    )
    return pending
