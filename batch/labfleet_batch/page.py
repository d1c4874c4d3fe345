"""The queue page at the service root (``/services/batch/``): the queue state, drawn.

For each group the caller may submit to: what the group's running jobs hold
against its quota (one horizontal bar per resource, inline SVG, no scripts)
and how many jobs run and wait; then the caller's own jobs, and for a group
admin the group's jobs. The data is what the API hands out: the same backend
calls as ``GET api/jobs`` (and ``?group=`` for admins), the same
:class:`~labfleet_batch.authz.Policy`.

Other users' jobs reach this module only as counts and sums (``group_usage``),
never as rows, unless the policy lets the caller list the group; a member
already learns the group's queue length from ``queue.pending_in_queue``.

Rendering is pure (:func:`group_usage`, :func:`render_page`); the handler
only gathers records. Browsers sign in through the hub's OAuth (HubOAuth);
tokens are accepted too, as by HubOAuth everywhere.
"""

from __future__ import annotations

import html
import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from jupyterhub.services.auth import HubOAuthenticated
from labfleet_spawner.catalogue import parse_quantity
from tornado import web

from .model import QUEUED, RUNNING, JobRecord
from .queues import GroupQuota

log = logging.getLogger(__name__)

MAX_ROWS = 50
BAR_WIDTH = 320  # px of a full bar (used == quota)
GIB = 1024**3


@dataclass(frozen=True)
class Bar:
    label: str  # "CPU", "memory", "t4", "jobs"
    used: float | None  # None: the backend does not report it
    quota: float
    unit: str = ""  # shown after the numbers: "GiB"
    scale: float = 1.0  # divide used and quota by this for the label

    @property
    def fraction(self) -> float:
        if self.used is None or self.quota <= 0:
            return 0.0
        return min(self.used / self.quota, 1.0)

    def text(self) -> str:
        used = "?" if self.used is None else f"{self.used / self.scale:g}"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.label}: {used} / {self.quota / self.scale:g}{unit}"


@dataclass(frozen=True)
class GroupUsage:
    name: str
    running: int
    waiting: int
    bars: list[Bar] = field(default_factory=list)


def group_usage(
    name: str,
    quota: GroupQuota,
    records: Iterable[JobRecord],
    measured: Mapping[str, float] | None = None,
) -> GroupUsage:
    """What ``records`` (all of the group's jobs) hold against ``quota``.

    Accelerators and jobs come from the running records (``count`` per pod
    times ``parallelism``, as the local backend's demand). A record does not
    say which size (CPU, memory) its job asked for, so those come from
    ``measured`` (the backend's own sums, keys ``cpu`` and ``memory`` in bytes)
    and show as unknown without it. Offloaded jobs run on the offload queue,
    not against the group's quota.
    """
    records = list(records)
    running = [r for r in records if r.state == RUNNING and not r.offload]
    waiting = sum(1 for r in records if r.state == QUEUED)
    measured = measured or {}
    bars = [
        Bar("CPU", measured.get("cpu"), float(quota.cpu)),
        Bar("memory", measured.get("memory"), float(parse_quantity(quota.memory)), "GiB", GIB),
    ]
    for acc, limit in sorted(quota.accelerators.items()):
        used = sum(r.count * r.parallelism for r in running if r.accelerator == acc)
        bars.append(Bar(acc, float(used), float(limit)))
    if quota.max_running:
        bars.append(Bar("running jobs", float(len(running)), float(quota.max_running)))
    return GroupUsage(name, len(running), waiting, bars)


def bars_svg(usage: GroupUsage) -> str:
    """One horizontal bar per resource: the filled part is used / quota."""
    row, label_w = 26, 150
    height = row * len(usage.bars) + 4
    width = label_w + BAR_WIDTH + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="quota use of group {html.escape(usage.name)}">'
    ]
    for i, bar in enumerate(usage.bars):
        y = 2 + i * row
        fill = bar.fraction * BAR_WIDTH
        # orange from 80 %, red when full: a glance tells whether a job would wait
        colour = "#d04848" if bar.fraction >= 1 else "#ee854a" if bar.fraction >= 0.8 else "#4878d0"
        text = html.escape(bar.text())
        parts.append(
            f'<text x="0" y="{y + 15}" font-size="12">{html.escape(bar.label)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{BAR_WIDTH}" height="20" fill="#eee" '
            'stroke="#bbb"/>'
            f'<rect class="used" data-resource="{html.escape(bar.label)}" x="{label_w}" '
            f'y="{y}" width="{fill:.1f}" height="20" fill="{colour}"><title>{text}</title></rect>'
            f'<text class="value" x="{label_w + 4}" y="{y + 15}" font-size="12">{text}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _newest_first(records: Iterable[JobRecord]) -> list[JobRecord]:
    return sorted(records, key=lambda r: (r.created or "", r.name), reverse=True)[:MAX_ROWS]


def _position(record: JobRecord) -> str:
    if record.state != QUEUED:
        return ""
    position = record.queue.get("position")
    if position is None:
        return "waiting"
    of = record.queue.get("pending_in_queue")
    return f"{position} of {of}" if of else str(position)


def jobs_table(records: Iterable[JobRecord], with_user: bool = False) -> str:
    rows = _newest_first(records)
    if not rows:
        return '<p class="empty">No jobs.</p>'
    head = "<th>user</th>" if with_user else ""
    out = [
        f"<table><tr><th>job</th>{head}<th>group</th><th>state</th>"
        "<th>accelerator</th><th>queue position</th><th>created</th></tr>"
    ]
    for r in rows:
        acc = f"{html.escape(r.accelerator)} &times; {r.count}" if r.accelerator else "&mdash;"
        user = f"<td>{html.escape(r.user)}</td>" if with_user else ""
        out.append(
            f'<tr class="job state-{html.escape(r.state)}" data-id="{html.escape(r.id)}">'
            f'<td title="{html.escape(r.id)}">{html.escape(r.display_name or r.name)}</td>'
            f"{user}<td>{html.escape(r.group)}</td>"
            f'<td class="state">{html.escape(r.state)}</td><td>{acc}</td>'
            f'<td class="position">{html.escape(_position(r))}</td>'
            f"<td>{html.escape(r.created or '')}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


PAGE = """<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="30"><title>labfleet batch queue</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:left}}
.group{{margin-bottom:1.5em}}</style></head><body>
<h1>Batch queue</h1><p>Signed in as {user}. This page refreshes every 30 seconds;
scripts use the <a href="api/jobs">API</a>.</p>
<h2>Groups</h2>{groups}
<h2>Your jobs</h2>{own}
{admin}</body></html>"""


def render_page(
    user: str,
    groups: Iterable[GroupUsage],
    own: Iterable[JobRecord],
    admin_jobs: Mapping[str, Iterable[JobRecord]] | None = None,
) -> str:
    """The whole page; ``admin_jobs``: the group's jobs, for groups the caller may list."""
    sections = []
    for g in groups:
        name = html.escape(g.name)
        sections.append(
            f'<div class="group" data-group="{name}"><h3>{name}</h3>'
            f'<p class="counts">{g.running} running, {g.waiting} waiting</p>{bars_svg(g)}</div>'
        )
    admin = []
    for group, records in sorted((admin_jobs or {}).items()):
        admin.append(
            f'<h2 class="admin">All jobs of group {html.escape(group)}</h2>'
            f"{jobs_table(records, with_user=True)}"
        )
    return PAGE.format(
        user=html.escape(user),
        groups="".join(sections) or '<p class="empty">You are in no batch group.</p>',
        own=jobs_table(own),
        admin="".join(admin),
    )


async def measured_usage(measure, group: str) -> dict[str, float] | None:
    """The backend's sums for ``group`` (sync locally, an API read on Kubernetes), or None:
    a failed read shows unknown bars rather than breaking the page."""
    if not callable(measure):
        return None
    try:
        measured = measure(group)
        if inspect.isawaitable(measured):
            measured = await measured
    except Exception as e:  # the API server's answer (403, 404, down): say so in the log
        log.warning("Cannot read the use of group %s: %s", group, e)
        return None
    return measured


#: At most this many status reads per page for positions a list did not include.
POSITION_READS = 10


async def with_positions(backend, records: list[JobRecord]) -> list[JobRecord]:
    """Waiting jobs get their queue position where the list left it out.

    The Kubernetes backend's list skips the visibility API (one call per job);
    the status read asks it, for the first :data:`POSITION_READS` waiting jobs,
    so the page costs a bounded number of API calls.
    """
    out, reads = [], 0
    for record in records:
        missing = record.state == QUEUED and record.queue.get("position") is None
        if missing and reads < POSITION_READS:
            reads += 1
            try:
                record = await backend.get(record.group, record.name) or record
            except Exception as e:  # a failed read leaves "waiting", not a broken page
                log.warning("Cannot read the position of %s: %s", record.id, e)
        out.append(record)
    return out


class QueuePageHandler(HubOAuthenticated, web.RequestHandler):
    """``GET <prefix>``: the page; the API's caller checks and visibility rules."""

    def initialize(self, ctx):
        self.ctx = ctx
        self.hub_auth = ctx.hub_auth

    def write_error(self, status_code: int, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = self._reason
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(f"<!doctype html><p>{status_code}: {html.escape(message)}</p>")

    @web.authenticated
    async def get(self):
        from .service import caller_from_model  # service imports this module

        caller = caller_from_model(self.current_user, self.hub_auth)
        cfg, policy, backend = self.ctx.config, self.ctx.policy, self.ctx.backend
        # Records do not carry job sizes: the backend sums them (the local backend from
        # its running jobs, the Kubernetes one from Kueue's LocalQueue status).
        measure = getattr(backend, "usage", None)
        usages, admin_jobs = [], {}
        for group in sorted(g for g in cfg.groups if policy.can_submit(caller, g)):
            records = await backend.list_jobs([group])
            measured = await measured_usage(measure, group)
            usages.append(group_usage(group, cfg.groups[group], records, measured))
            if policy.can_list_group(caller, group):
                admin_jobs[group] = records
        # as GET api/jobs: own jobs, also in groups the caller has left since
        own = await backend.list_jobs(sorted(cfg.groups), caller.name)
        own = await with_positions(backend, own)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(render_page(caller.name, usages, own, admin_jobs))
