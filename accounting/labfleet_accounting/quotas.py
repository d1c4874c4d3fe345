"""Group quota management: group admins set their Kueue quotas within the platform admin's caps.

A group's batch quota lives in its Kueue ClusterQueue (``kueue.x-k8s.io/v1beta2``,
named as :class:`labfleet_batch.queues.QueueConfig` names it:
``<name_prefix><group>``), as ``nominalQuota`` and ``borrowingLimit`` per
flavor and resource in ``spec.resourceGroups``. The platform admin sets caps
per (group, flavor, resource) in the ``quota_cap`` table; a group admin may
change any capped entry up to its cap, nothing else.

The pure half validates a change and computes the new ``resourceGroups``
(:func:`parse_changes`, :func:`check_caps`, :func:`apply_changes`). The
:class:`QuotaManager` reads the ClusterQueue, writes it back with a JSON
merge patch carrying the ``resourceVersion`` it read (the API server refuses
the patch with 409 if someone changed the queue in between; it is retried on
a fresh read) -- the object is updated in place, never deleted and
recreated, so Kueue keeps its admitted workloads -- and records who changed
what, when, old and new, in the audit log in the same step.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from sqlalchemy import Engine, select

from .models import AuditEntry, QuotaCap

KUEUE = "/apis/kueue.x-k8s.io/v1beta2"
_SUFFIX = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal(10**3), "K": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
    "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[numkKMGTPE]?)$")


class QuotaError(ValueError):
    """A malformed request (HTTP 400)."""


class OverCap(QuotaError):
    """Above the platform admin's cap, or on an entry without one (HTTP 400, naming the
    field: the same validation in both modes)."""


def quantity(value) -> Decimal:
    """A Kubernetes quantity (``4``, ``500m``, ``16Gi``) as an exact number."""
    if isinstance(value, bool):
        raise QuotaError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        if value < 0:
            raise QuotaError(f"{value!r} is negative")
        return Decimal(str(value))
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise QuotaError(f"{value!r} is not a quantity like 4, 500m or 16Gi")
    try:
        return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except InvalidOperation:
        raise QuotaError(f"{value!r} is not a quantity") from None


@dataclass(frozen=True)
class Change:
    flavor: str
    resource: str
    nominal: str | None = None  # None: unchanged
    borrowing: str | None = None  # None: unchanged; "" removes the limit (unbounded)


@dataclass(frozen=True)
class Cap:
    flavor: str
    resource: str
    max_nominal: str
    max_borrowing: str = "0"

    def as_dict(self) -> dict:
        return {"max_nominal": self.max_nominal, "max_borrowing": self.max_borrowing}


def _qty_text(value) -> str:
    text = str(value).strip()
    quantity(text)  # validates
    return text


def parse_changes(body) -> list[Change]:
    """``{"quotas": [{"flavor", "resource", "nominalQuota"?, "borrowingLimit"?}]}`` -> changes."""
    if not isinstance(body, Mapping) or not isinstance(body.get("quotas"), list):
        raise QuotaError(
            'body must be {"quotas": [{"flavor": ..., "resource": ..., '
            '"nominalQuota": "4", "borrowingLimit": "2"}]}'
        )
    changes, seen = [], set()
    for i, item in enumerate(body["quotas"]):
        if not isinstance(item, Mapping) or not item.get("flavor") or not item.get("resource"):
            raise QuotaError(f"quotas[{i}]: flavor and resource are required")
        extra = sorted(set(item) - {"flavor", "resource", "nominalQuota", "borrowingLimit"})
        if extra:
            raise QuotaError(f"quotas[{i}]: unknown field(s) {', '.join(extra)}")
        key = (str(item["flavor"]), str(item["resource"]))
        if key in seen:
            raise QuotaError(f"quotas[{i}]: {key[0]}/{key[1]} appears twice")
        seen.add(key)
        nominal = borrowing = None
        for name in ("nominalQuota", "borrowingLimit"):
            if item.get(name) is None:
                continue
            try:
                text = _qty_text(item[name])
            except QuotaError as e:
                raise QuotaError(f"quotas[{i}].{name}: {e}") from None
            if name == "nominalQuota":
                nominal = text
            else:
                borrowing = text
        changes.append(Change(key[0], key[1], nominal, borrowing))
    if not changes:
        raise QuotaError("quotas is empty: nothing to change")
    return changes


def check_caps(group: str, changes: Iterable[Change], caps: Mapping[tuple[str, str], Cap]):
    """Raise :class:`OverCap` unless every change is capped and within its cap."""
    for i, ch in enumerate(changes):
        cap = caps.get((ch.flavor, ch.resource))
        if cap is None:
            raise OverCap(
                f"quotas[{i}].flavor: group {group!r} has no cap for {ch.resource} on flavor "
                f"{ch.flavor!r} (an entry it does not have, or not capped yet: a platform "
                "admin must set a cap first)"
            )
        if ch.nominal is not None and quantity(ch.nominal) > quantity(cap.max_nominal):
            raise OverCap(
                f"quotas[{i}].nominalQuota: {ch.nominal} of {ch.resource} on {ch.flavor!r} "
                f"exceeds the cap {cap.max_nominal} set by the platform admin"
            )
        if ch.resource == "jobs" and ch.nominal is not None and quantity(ch.nominal) == 0:
            # a single node's running jobs: 0 means no limit, which no cap allows
            raise OverCap(
                f"quotas[{i}].nominalQuota: 0 jobs means no limit on {ch.flavor!r}, above "
                f"the cap {cap.max_nominal} set by the platform admin"
            )
        if ch.borrowing is not None and quantity(ch.borrowing) > quantity(cap.max_borrowing):
            raise OverCap(
                f"quotas[{i}].borrowingLimit: {ch.borrowing} of {ch.resource} on "
                f"{ch.flavor!r} exceeds the cap {cap.max_borrowing} set by the platform admin"
            )


def quota_entries(resource_groups: Iterable[Mapping]) -> list[dict]:
    """Flat ``[{flavor, resource, nominalQuota, borrowingLimit?}]`` of a ClusterQueue spec."""
    out = []
    for rg in resource_groups or []:
        for flavor in rg.get("flavors") or []:
            for res in flavor.get("resources") or []:
                entry = {"flavor": flavor["name"], "resource": res["name"],
                         "nominalQuota": str(res.get("nominalQuota", "0"))}  # fmt: skip
                if "borrowingLimit" in res:
                    entry["borrowingLimit"] = str(res["borrowingLimit"])
                out.append(entry)
    return out


def apply_changes(resource_groups: list, changes: Iterable[Change]) -> list:
    """New ``resourceGroups`` with the changes made; flavors and resources must exist. Pure."""
    groups = copy.deepcopy(resource_groups or [])
    index = {}
    for rg in groups:
        for flavor in rg.get("flavors") or []:
            for res in flavor.get("resources") or []:
                index[(flavor["name"], res["name"])] = res
    for ch in changes:
        res = index.get((ch.flavor, ch.resource))
        if res is None:
            known = ", ".join(f"{f}/{r}" for f, r in sorted(index)) or "(none)"
            raise QuotaError(
                f"the ClusterQueue has no {ch.resource} on flavor {ch.flavor!r}; it has: {known}"
            )
        if ch.nominal is not None:
            res["nominalQuota"] = ch.nominal
        if ch.borrowing is not None:
            res["borrowingLimit"] = ch.borrowing
    return groups


class QuotaManager:
    """Reads and patches group ClusterQueues; keeps caps and the audit log in the ledger DB.

    ``kube`` has ``async request(method, path, body=None, content_type=...)``
    returning parsed JSON and raising an exception with ``.status`` on HTTP
    errors (:class:`labfleet_batch.kube.KubeAPI`). ``cluster_queue`` maps a
    group to its ClusterQueue name.
    """

    mode = "kubernetes"

    def __init__(self, kube, engine: Engine, cluster_queue=lambda g: f"labfleet-{g}",
                 clock=time.time, retries: int = 3):  # fmt: skip
        self.kube = kube
        self.engine = engine
        self.cluster_queue = cluster_queue
        self.clock = clock
        self.retries = retries

    # -- caps --------------------------------------------------------------------

    def caps(self, group: str) -> dict[tuple[str, str], Cap]:
        table = QuotaCap.__table__
        with self.engine.connect() as connection:
            rows = connection.execute(select(table).where(table.c.group_name == group)).mappings()
            return {
                (r["flavor"], r["resource"]): Cap(
                    r["flavor"], r["resource"], r["max_nominal"], r["max_borrowing"]
                )
                for r in rows
            }

    def set_caps(self, actor: str, group: str, caps: Iterable[Cap]) -> dict:
        """Replace the caps of ``group`` (platform admins); audited."""
        caps = list(caps)
        for cap in caps:
            quantity(cap.max_nominal), quantity(cap.max_borrowing)
        before = {f"{f}/{r}": c.as_dict() for (f, r), c in self.caps(group).items()}
        after = {f"{c.flavor}/{c.resource}": c.as_dict() for c in caps}
        with self.engine.begin() as connection:
            connection.execute(QuotaCap.__table__.delete().where(QuotaCap.group_name == group))
            if caps:
                connection.execute(
                    QuotaCap.__table__.insert(),
                    [{"group_name": group, "flavor": c.flavor, "resource": c.resource,
                      "max_nominal": c.max_nominal, "max_borrowing": c.max_borrowing}
                     for c in caps],
                )  # fmt: skip
            self._audit(connection, actor, "quota_cap.set", group, before, after)
        return after

    # -- the ClusterQueue ------------------------------------------------------------

    def _path(self, group: str) -> str:
        return f"{KUEUE}/clusterqueues/{self.cluster_queue(group)}"

    async def get(self, group: str) -> dict:
        cq = await self.kube.request("GET", self._path(group))
        caps = self.caps(group)
        quotas = quota_entries(cq["spec"].get("resourceGroups"))
        for q in quotas:
            cap = caps.get((q["flavor"], q["resource"]))
            q["cap"] = cap.as_dict() if cap else None
        return {"group": group, "cluster_queue": cq["metadata"]["name"], "quotas": quotas,
                "where": f"Kueue ClusterQueue {cq['metadata']['name']}"}  # fmt: skip

    async def set(self, actor: str, group: str, changes: list[Change]) -> dict:
        """Check caps, patch the ClusterQueue in place, audit. Returns ``get``'s answer."""
        check_caps(group, changes, self.caps(group))
        for attempt in range(self.retries):
            cq = await self.kube.request("GET", self._path(group))
            before = cq["spec"].get("resourceGroups") or []
            after = apply_changes(before, changes)
            patch = {
                # the version read: a concurrent writer makes this 409, and we read again
                "metadata": {"resourceVersion": cq["metadata"]["resourceVersion"]},
                # merge patch replaces lists whole: the complete resourceGroups, edited
                "spec": {"resourceGroups": after},
            }
            try:
                await self.kube.request(
                    "PATCH", self._path(group), body=patch,
                    content_type="application/merge-patch+json",
                )  # fmt: skip
            except Exception as e:
                if getattr(e, "status", None) == 409 and attempt + 1 < self.retries:
                    continue
                raise
            with self.engine.begin() as connection:
                self._audit(
                    connection, actor, "quota.set", group,
                    quota_entries(before), quota_entries(after),
                    cluster_queue=cq["metadata"]["name"],
                )  # fmt: skip
            break
        return await self.get(group)

    # -- audit ---------------------------------------------------------------------

    def _audit(self, connection, actor, action, target, before, after, **extra):
        detail = {"before": before, "after": after, **extra}
        connection.execute(
            AuditEntry.__table__.insert().values(
                at_s=int(self.clock()), actor=actor, action=action, target=target,
                detail=json.dumps(detail, sort_keys=True),
            )
        )  # fmt: skip

    def audit(self, target: str | None = None, limit: int = 100) -> list[dict]:
        t = AuditEntry.__table__
        query = select(t).order_by(t.c.at_s.desc(), t.c.id.desc())
        if target is not None:
            query = query.where(t.c.target == target)
        with self.engine.connect() as connection:
            rows = connection.execute(query.limit(limit)).mappings().all()
        return [
            {"at": r["at_s"], "actor": r["actor"], "action": r["action"], "target": r["target"],
             **json.loads(r["detail"] or "{}")}
            for r in rows
        ]  # fmt: skip
