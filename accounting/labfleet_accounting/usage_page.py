"""The usage page (``/services/accounting/``): charts per day, the period's totals and
the recent sessions and jobs.

Pure: the handler (:class:`labfleet_accounting.service.PageHandler`) reads the
ledger and hands the summary and the series here. The page is the hub's own
``page.html`` (:mod:`labfleet_hub.service_page`): its navigation bar,
stylesheet and dark mode.

Conventions shared by the charts and the table: hours are written by
:func:`~labfleet_accounting.reports.format_hours` everywhere (axis ticks,
tooltips, table cells), and each chart's unit is its table column's header.
A resource nobody used in the period gets a sentence, not an empty chart.
Every name that comes from the ledger (users, groups, profiles, jobs, pods) is
HTML-escaped.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import urlencode

from labfleet_hub.service_page import HubNav, render_service_page

from .reports import format_hours, series_svg, series_total

#: (series metric, chart heading, unit = the table's column header, what "no use" names)
CHARTS = (
    ("gpu_hours", "GPU-hours per day", "GPU-h", "GPU"),
    ("cpu_core_hours", "CPU core-hours per day", "CPU core-h", "CPU"),
)
#: The totals table's numeric columns: (header, value of one kind's summary).
COLUMNS = (
    ("GPU-h", lambda acc: acc["gpu_hours_total"]),
    ("FPGA-h", lambda acc: sum(acc["fpga_hours"].values())),
    ("CPU core-h", lambda acc: acc["cpu_core_hours"]),
    ("memory GB-h", lambda acc: acc["memory_gb_hours"]),
)
LEGEND = (
    '<p class="legend small">'
    '<span class="swatch" style="background:#4878d0"></span>interactive '
    '<span class="swatch" style="background:#ee854a"></span>batch</p>'
)
STYLE = (
    "<style>.labfleet-service .legend .swatch{display:inline-block;width:1em;height:1em;"
    "margin:0 4px;vertical-align:-0.125em}</style>"
)


def chart(series: list[dict], metric: str, heading: str, unit: str, what: str, period: str) -> str:
    """One chart with its heading, or a sentence when nothing of ``metric`` was used."""
    if series_total(series, metric) <= 0:
        body = f'<p class="no-use text-body-secondary">No {what} use in {html.escape(period)}.</p>'
    else:
        body = series_svg(series, metric, unit=unit) + LEGEND
    return (
        f'<section class="chart" data-metric="{metric}">'
        f'<h2 class="h4">{heading}</h2>{body}</section>'
    )


def totals_table(summary: Mapping[str, Mapping], by: str, period: str) -> str:
    """The period's totals per ``by`` (user or group) and kind, as :data:`COLUMNS`."""
    head = "".join(f'<th class="num">{h}</th>' for h, _ in COLUMNS)
    rows = []
    for name in sorted(summary):
        for kind in ("interactive", "batch"):
            acc = summary[name].get(kind)
            if acc:
                cells = "".join(f'<td class="num">{format_hours(f(acc))}</td>' for _, f in COLUMNS)
                rows.append(f"<tr><td>{html.escape(name)}</td><td>{kind}</td>{cells}</tr>")
    if not rows:
        rows.append(
            f'<tr><td colspan="{len(COLUMNS) + 2}" class="text-body-secondary">'
            f"No use in {html.escape(period)}.</td></tr>"
        )
    return (
        '<div class="table-responsive"><table id="totals" class="table table-sm table-hover">'
        f"<thead><tr><th>{by}</th><th>kind</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


#: The recent table's hour columns: (header, key of a :func:`reports.describe_interval` entry).
RECENT_HOURS = (
    ("CPU core-h", "cpu_core_hours"),
    ("memory GB-h", "memory_gb_hours"),
    ("GPU-h", "gpu_hours"),
)


def format_duration(seconds: int) -> str:
    """``42 s``, ``12 min 5 s``, ``2 h``, ``2 h 5 min``, ``3 d 4 h``: at most two units."""
    seconds = max(int(seconds), 0)
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if seconds >= size or unit == "s":
            text = f"{seconds // size} {unit}"
            if i + 1 < len(units):
                small_unit, small_size = units[i + 1]
                small = seconds % size // small_size
                if small:
                    text += f" {small} {small_unit}"
            return text
    raise AssertionError("unreachable")


def format_start(epoch: int) -> str:
    """A start as the batch page writes times: ``2025-03-01 12:00 UTC``, exact in ``datetime``."""
    when = datetime.fromtimestamp(int(epoch), UTC)
    return (
        f'<time datetime="{when.strftime("%Y-%m-%dT%H:%M:%SZ")}">'
        f"{when.strftime('%Y-%m-%d %H:%M')} UTC</time>"
    )


def recent_table(entries: Sequence[Mapping], period: str, limit: int | None = None) -> str:
    """The recent sessions and jobs (:func:`reports.describe_interval` entries), as given."""
    e = html.escape
    head = "".join(f'<th class="num">{h}</th>' for h, _ in RECENT_HOURS)
    rows = []
    for entry in entries:
        acc = entry.get("accelerator") or ""
        accelerator = f"{e(acc)} &times; {int(entry.get('accelerator_count') or 0)}" if acc else ""
        running = entry.get("running")
        duration = "running" if running else format_duration(entry.get("seconds", 0))
        hours = "".join(
            f'<td class="num">{format_hours(entry.get(key, 0))}</td>' for _, key in RECENT_HOURS
        )
        state = "running" if running else "ended"
        rows.append(
            f'<tr class="interval kind-{e(entry["kind"])} {state}">'
            f"<td>{e(entry['kind'])}</td>"
            f'<td class="what text-break">{e(entry.get("what") or "")}</td>'
            f'<td class="user">{e(entry.get("user") or "")}</td>'
            f'<td class="group">{e(entry.get("group") or "")}</td>'
            f"<td>{e(entry.get('profile') or '')}</td>"
            f'<td class="text-nowrap">{accelerator or "&mdash;"}</td>'
            f'<td class="started text-nowrap">{format_start(entry["start"])}</td>'
            f'<td class="duration num text-nowrap">{duration}</td>{hours}</tr>'
        )
    if not rows:
        rows.append(
            f'<tr><td colspan="{len(RECENT_HOURS) + 8}" class="text-body-secondary">'
            f"No sessions or jobs in {e(period)}.</td></tr>"
        )
    more = (
        f'<p class="small text-body-secondary">The latest {limit}; older ones count in the '
        "totals above.</p>"
        if limit and len(entries) >= limit
        else ""
    )
    return (
        '<div class="table-responsive"><table id="recent" class="table table-sm table-hover">'
        '<thead><tr class="text-nowrap"><th>kind</th><th>what</th><th>user</th><th>group</th>'
        '<th>profile</th><th>accelerator</th><th>started</th><th class="num">duration</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>{more}"
    )


def quota_links(groups: Sequence[str], prefix: str = "") -> str:
    """Links to the batch quota pages of the groups the viewer administers."""
    if not groups:
        return ""
    links = " ".join(
        f'<a class="btn btn-sm btn-outline-primary" '
        f'href="{html.escape(prefix + "quotas?" + urlencode({"group": g}))}">'
        f"{html.escape(g)}</a>"
        for g in groups
    )
    return f'<p id="quota-links">Batch quotas you manage: {links}</p>'


def render_usage_page(
    user: Mapping,
    period: str,
    scope: str,
    summary: Mapping[str, Mapping],
    series: list[dict],
    by: str,
    group: str | None = None,
    nav: HubNav | None = None,
    prefix: str = "",
    recent: Sequence[Mapping] = (),
    recent_limit: int | None = None,
    quota_groups: Sequence[str] = (),
) -> str:
    """The whole page. ``user``: the hub's user model; ``scope``: whose usage, in words;
    ``prefix``: the service's, for the links (relative without it); ``recent``: the
    sessions and jobs (:func:`reports.describe_interval`), newest first, at most
    ``recent_limit`` (0: no such section); ``quota_groups``: the groups whose quota
    page the viewer administers (a link each)."""
    query = {"period": period, "by": by, **({"group": group} if group else {})}
    csv_href = html.escape(f"{prefix}api/usage?{urlencode({**query, 'format': 'csv'})}")
    json_href = html.escape(f"{prefix}api/usage?{urlencode(query)}")
    recent_query = {k: v for k, v in query.items() if k != "by"}
    recent_href = html.escape(f"{prefix}api/usage/recent?{urlencode(recent_query)}")
    charts = "".join(chart(series, *spec, period) for spec in CHARTS)
    recent_section = (
        '<section class="recent"><h2 class="h4">Recent sessions and jobs</h2>'
        '<p class="small text-body-secondary">Newest first. The hours are those of the whole '
        "session or job, also outside the period; a running one's so far.</p>"
        f"{recent_table(recent, period, recent_limit)}"
        f'<p><a class="btn btn-sm btn-outline-secondary" href="{recent_href}">JSON</a></p>'
        "</section>"
        if recent_limit != 0
        else ""
    )
    body = (
        f'<h1 class="h2">Usage {html.escape(period)}</h1>'
        f'<p class="text-body-secondary">Signed in as {html.escape(str(user.get("name", "")))}. '
        f"{html.escape(scope)} Hours are wall-clock hours times the resource held "
        "(memory in decimal GB).</p>"
        f"{quota_links(quota_groups, prefix)}"
        f"{charts}"
        f'<h2 class="h4">Totals</h2>{totals_table(summary, by, period)}'
        f'<p><a class="btn btn-sm btn-outline-secondary" href="{csv_href}">CSV</a> '
        f'<a class="btn btn-sm btn-outline-secondary" href="{json_href}">JSON</a></p>'
        f"{recent_section}"
    )
    return render_service_page(nav or HubNav(), user, f"Usage {period}", body, head=STYLE)
