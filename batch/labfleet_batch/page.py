"""The queue page at the service root (``/services/batch/``): the queue state, drawn.

For each group the caller may submit to: what the group's running jobs hold
against its quota (one horizontal bar per resource, inline SVG) and how many
jobs run and wait; then the caller's own jobs, and for a group admin the
group's jobs. Each job shows the name its owner recognises (the display name,
with the job's id under it), its state, why it failed or waits, and a link
to its page (``jobs/<group>/<name>``: details and each completion's log).
The data is what the API hands out: the same backend calls as ``GET
api/jobs`` (and ``?group=`` for admins), the same
:class:`~labfleet_batch.authz.Policy`.

Other users' jobs reach this module only as counts and sums (``group_usage``),
never as rows, unless the policy lets the caller list the group; a member
already learns the group's queue length from ``queue.pending_in_queue``.

The pages are the hub's own ``page.html`` (:mod:`labfleet_hub.service_page`):
its navigation bar, stylesheet and dark mode. Rendering is pure
(:func:`group_usage`, :func:`render_page`, :func:`render_job_page`); the
handlers only gather records. Browsers sign in through the hub's OAuth
(HubOAuth); tokens are accepted too, as by HubOAuth everywhere.
"""

from __future__ import annotations

import html
import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from jupyterhub.services.auth import HubOAuthenticated
from labfleet_hub.bodylimit import BodyLimit
from labfleet_hub.service_page import HubNav, render_service_page
from labfleet_spawner.catalogue import parse_quantity
from tornado import web

from .model import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    JobRecord,
    LogsUnavailable,
    completion_index,
)
from .queues import GroupQuota

log = logging.getLogger(__name__)

MAX_ROWS = 50
BAR_WIDTH = 320  # px of a full bar (used == quota)
GIB = 1024**3
#: The job page shows at most the end of a log this long; the CLI reads all of it.
LOG_TAIL_BYTES = 256 * 1024
#: Links to at most this many completions' logs on the job page.
MAX_INDEX_LINKS = 100
#: Bootstrap badge colour per state, as the hub's own pages colour status.
STATE_BADGE = {
    QUEUED: "text-bg-secondary",
    RUNNING: "text-bg-primary",
    "succeeded": "text-bg-success",
    FAILED: "text-bg-danger",
    CANCELLED: "text-bg-warning",
}


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
    ``measured`` (the backend's own sums, keys ``cpu`` and ``memory`` in bytes):
    a key missing from them is nothing held (the local backend leaves out what
    no running job holds), and only without them (None: no sums, or the read
    failed) are CPU and memory unknown. Offloaded jobs run on the offload
    queue, not against the group's quota.
    """
    records = list(records)
    running = [r for r in records if r.state == RUNNING and not r.offload]
    waiting = sum(1 for r in records if r.state == QUEUED)

    def held(key: str) -> float | None:
        return None if measured is None else float(measured.get(key, 0))

    bars = [
        Bar("CPU", held("cpu"), float(quota.cpu)),
        Bar("memory", held("memory"), float(parse_quantity(quota.memory)), "GiB", GIB),
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
            f'<rect class="track" x="{label_w}" y="{y}" width="{BAR_WIDTH}" height="20" '
            'fill="#eee" stroke="#bbb"/>'
            f'<rect class="used" data-resource="{html.escape(bar.label)}" x="{label_w}" '
            f'y="{y}" width="{fill:.1f}" height="20" fill="{colour}" fill-opacity="0.85">'
            f"<title>{text}</title></rect>"
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


def reason(record: JobRecord) -> str:
    """Why a job failed, was cancelled or still waits; "" when there is nothing to say."""
    if record.state in (FAILED, CANCELLED):
        return record.message or ("no reason recorded" if record.state == FAILED else "")
    if record.state == QUEUED:
        return str(record.queue.get("message") or "")
    return ""


def job_href(prefix: str, record: JobRecord) -> str:
    """The job's page under the service ``prefix`` (``/services/batch/``)."""
    return f"{prefix}jobs/{quote(record.group, safe='')}/{quote(record.name, safe='')}"


def state_badge(state: str) -> str:
    colour = STATE_BADGE.get(state, "text-bg-light")
    return f'<span class="badge {colour}">{html.escape(state)}</span>'


def _created(value: str | None) -> str:
    if not value:
        return ""
    shown = value.replace("T", " ").removesuffix("Z")[:16] + " UTC" if "T" in value else value
    return f'<time datetime="{html.escape(value)}">{html.escape(shown)}</time>'


def jobs_table(records: Iterable[JobRecord], with_user: bool = False, prefix: str = "") -> str:
    rows = _newest_first(records)
    if not rows:
        return '<p class="empty text-body-secondary">No jobs.</p>'
    head = "<th>user</th>" if with_user else ""
    out = [
        '<div class="table-responsive"><table class="table table-sm table-hover align-middle">'
        f'<thead><tr class="text-nowrap"><th>job</th>{head}<th>group</th><th>state</th>'
        "<th>reason</th>"
        "<th>accelerator</th><th>queue position</th><th>created</th><th></th></tr></thead><tbody>"
    ]
    for r in rows:
        acc = f"{html.escape(r.accelerator)} &times; {r.count}" if r.accelerator else "&mdash;"
        user = f"<td>{html.escape(r.user)}</td>" if with_user else ""
        href = html.escape(job_href(prefix, r))
        # a job that has not started has no logs yet; its page still says why it waits
        link = "details" if r.state == QUEUED else "logs"
        out.append(
            f'<tr class="job state-{html.escape(r.state)}" data-id="{html.escape(r.id)}">'
            f'<td class="name"><a class="job-name fw-semibold" href="{href}">'
            f"{html.escape(r.display_name or r.name)}</a><br>"
            '<small class="job-id text-body-secondary text-nowrap">'
            f"{html.escape(r.id)}</small></td>"
            f"{user}<td>{html.escape(r.group)}</td>"
            f'<td class="state">{state_badge(r.state)}</td>'
            f'<td class="reason small">{html.escape(reason(r))}</td><td>{acc}</td>'
            f'<td class="position">{html.escape(_position(r))}</td>'
            f'<td class="text-nowrap">{_created(r.created)}</td>'
            f'<td class="logs"><a href="{href}">{link}</a></td></tr>'
        )
    out.append("</tbody></table></div>")
    return "".join(out)


def _as_user(user: str | Mapping) -> Mapping:
    return {"name": user} if isinstance(user, str) else user


def render_page(
    user: str | Mapping,
    groups: Iterable[GroupUsage],
    own: Iterable[JobRecord],
    admin_jobs: Mapping[str, Iterable[JobRecord]] | None = None,
    *,
    nav: HubNav | None = None,
    prefix: str = "",
) -> str:
    """The whole page; ``admin_jobs``: the group's jobs, for groups the caller may list.

    ``user``: the hub's user model (or just the name); ``prefix``: the service's
    prefix, for links (relative without it).
    """
    user = _as_user(user)
    sections = []
    for g in groups:
        name = html.escape(g.name)
        sections.append(
            f'<div class="group col" data-group="{name}"><div class="card mb-3"><div '
            f'class="card-body"><h3 class="h5 card-title">{name}</h3>'
            f'<p class="counts card-text">{g.running} running, {g.waiting} waiting</p>'
            f"{bars_svg(g)}</div></div></div>"
        )
    admin = []
    for group, records in sorted((admin_jobs or {}).items()):
        admin.append(
            f'<h2 class="admin h4 mt-4">All jobs of group {html.escape(group)}</h2>'
            f"{jobs_table(records, with_user=True, prefix=prefix)}"
        )
    groups_html = (
        f'<div class="row row-cols-1 row-cols-lg-2">{"".join(sections)}</div>'
        if sections
        else '<p class="empty text-body-secondary">You are in no batch group.</p>'
    )
    body = (
        '<h1 class="h2">Batch queue</h1><p class="text-body-secondary">Signed in as '
        f"{html.escape(str(user.get('name', '')))}. This page refreshes every 30 seconds; "
        f'scripts use the <a href="{html.escape(prefix)}api/jobs">API</a> '
        "(<code>labfleet-batch</code> from a notebook).</p>"
        f'<h2 class="h4 mt-4">Groups</h2>{groups_html}'
        f'<h2 class="h4 mt-4">Your jobs</h2>{jobs_table(own, prefix=prefix)}'
        f"{''.join(admin)}"
    )
    return render_service_page(nav or HubNav(), user, "Batch queue", body, refresh=30)


def _tail(text: str) -> tuple[str, bool]:
    data = text.encode("utf-8", errors="replace")
    if len(data) <= LOG_TAIL_BYTES:
        return text, False
    return data[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace"), True


def render_job_page(
    user: str | Mapping,
    record: JobRecord,
    index: int,
    logs: str | None,
    logs_missing: str = "",
    *,
    nav: HubNav | None = None,
    prefix: str = "",
) -> str:
    """One job: what it is, why it failed or waits, and completion ``index``'s log.

    ``logs``: that completion's log text, or None with ``logs_missing`` saying why.
    """
    user = _as_user(user)
    e = html.escape
    facts = [
        ("state", state_badge(record.state)),
        ("reason", e(reason(record)) or "&mdash;"),
        ("group", e(record.group)),
        ("user", e(record.user)),
        ("profile", e(record.profile or "") or "&mdash;"),
        (
            "accelerator",
            f"{e(record.accelerator)} &times; {record.count}" if record.accelerator else "&mdash;",
        ),
        ("priority", e(record.priority or "") or "&mdash;"),
        (
            "completions",
            f"{record.completions} ({record.succeeded} succeeded, {record.failed} failed, "
            f"{record.active} running)",
        ),
        ("created", _created(record.created) or "&mdash;"),
    ]
    if record.state == QUEUED:
        facts.insert(2, ("queue position", e(_position(record))))
    if record.workdir:
        facts.append(("folder", f"<code>{e(record.workdir)}</code>"))
    dl = "".join(
        f'<dt class="col-sm-3">{k}</dt><dd class="col-sm-9 fact-{k.replace(" ", "-")}">{v}</dd>'
        for k, v in facts
    )
    href = e(job_href(prefix, record))
    links = []
    for i in range(min(record.completions, MAX_INDEX_LINKS)):
        active = " active" if i == index else ""
        links.append(
            f'<li class="page-item{active}">'
            f'<a class="page-link" href="{href}?index={i}">{i}</a></li>'
        )
    pager = (
        '<nav aria-label="completions"><ul class="pagination pagination-sm flex-wrap">'
        f"{''.join(links)}</ul></nav>"
        if record.completions > 1
        else ""
    )
    if logs is None:
        log_html = f'<p class="logs-missing text-body-secondary">No log yet: {e(logs_missing)}</p>'
    else:
        text, cut = _tail(logs)
        note = (
            f'<p class="small text-body-secondary">The last {LOG_TAIL_BYTES // 1024} KiB; '
            "the whole log with the command below.</p>"
            if cut
            else ""
        )
        log_html = (
            f'{note}<pre id="job-log" class="border rounded p-2 bg-body-tertiary" '
            f'style="max-height:60vh;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere">'
            f"{e(text) or '(empty)'}</pre>"
        )
    body = (
        f'<p><a href="{e(prefix) or "./"}">&larr; Batch queue</a></p>'
        f'<h1 class="h2 job-name">{e(record.display_name or record.name)}</h1>'
        f'<p class="job-id text-body-secondary">{e(record.id)}</p>'
        f'<dl class="row job-facts">{dl}</dl>'
        f'<h2 class="h4 mt-4">Log of completion {index}</h2>{pager}{log_html}'
        f'<p class="small text-body-secondary">From a notebook: <code>labfleet-batch logs '
        f"{e(record.id)} --index {index} --follow</code></p>"
    )
    refresh = None if record.state in FINAL_STATES else 10
    title = f"{record.display_name or record.name} · batch job"
    return render_service_page(nav or HubNav(), user, title, body, refresh=refresh)


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


class PageBase(HubOAuthenticated, BodyLimit, web.RequestHandler):
    """The browser pages: hub OAuth, the API's caller checks, the hub's layout."""

    def initialize(self, ctx):
        self.ctx = ctx
        self.hub_auth = ctx.hub_auth

    @property
    def nav(self) -> HubNav:
        return self.ctx.nav or HubNav.from_hub_auth(self.hub_auth)

    @property
    def prefix(self) -> str:
        return self.settings.get("service_prefix", "")

    def caller(self):
        from .service import caller_from_model  # service imports this module

        return caller_from_model(self.current_user, self.hub_auth)

    def write_error(self, status_code: int, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = self._reason
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        body = (
            f'<h1 class="h2">{status_code} {html.escape(self._reason)}</h1>'
            f'<p class="error-message">{html.escape(message)}</p>'
            f'<p><a href="{html.escape(self.prefix) or "./"}">Batch queue</a></p>'
        )
        user = getattr(self, "_hub_auth_user_cache", None)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(render_service_page(self.nav, user, f"{status_code} · batch", body))

    def send_page(self, page: str) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(page)


class QueuePageHandler(PageBase):
    """``GET <prefix>``: the page; the API's caller checks and visibility rules."""

    @web.authenticated
    async def get(self):
        caller = self.caller()
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
        self.send_page(
            render_page(
                self.current_user, usages, own, admin_jobs, nav=self.nav, prefix=self.prefix
            )
        )


class JobPageHandler(PageBase):
    """``GET <prefix>jobs/<group>/<name>[?index=i]``: one job and a completion's log.

    The API's rules: a job the caller may not see is 404, like a missing one.
    """

    @web.authenticated
    async def get(self, group: str, name: str):
        caller = self.caller()
        backend = self.ctx.backend
        record = await backend.get(group, name)
        if record is None or not self.ctx.policy.can_access(caller, record.user, group):
            raise web.HTTPError(404, f"no job {group}/{name} that you may see")
        try:
            index = completion_index(self.get_argument("index", "0"), record.completions)
        except ValueError as e:
            raise web.HTTPError(400, "%s", str(e)) from None
        logs, missing = None, ""
        try:
            logs = await backend.logs(group, name, index)
        except LogsUnavailable as e:
            missing = str(e)
        except KeyError:
            missing = "the job is gone"
        self.send_page(
            render_job_page(
                self.current_user, record, index, logs, missing, nav=self.nav, prefix=self.prefix
            )
        )
