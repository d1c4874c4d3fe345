"""The usage page (``/services/accounting/``): charts per day and the period's totals.

Pure: the handler (:class:`labfleet_accounting.service.PageHandler`) reads the
ledger and hands the summary and the series here. The page is the hub's own
``page.html`` (:mod:`labfleet_hub.service_page`): its navigation bar,
stylesheet and dark mode.

Conventions shared by the charts and the table: hours are written by
:func:`~labfleet_accounting.reports.format_hours` everywhere (axis ticks,
tooltips, table cells), and each chart's unit is its table column's header.
A resource nobody used in the period gets a sentence, not an empty chart.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
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
) -> str:
    """The whole page. ``user``: the hub's user model; ``scope``: whose usage, in words;
    ``prefix``: the service's, for the links (relative without it)."""
    query = {"period": period, "by": by, **({"group": group} if group else {})}
    csv_href = html.escape(f"{prefix}api/usage?{urlencode({**query, 'format': 'csv'})}")
    json_href = html.escape(f"{prefix}api/usage?{urlencode(query)}")
    charts = "".join(chart(series, *spec, period) for spec in CHARTS)
    body = (
        f'<h1 class="h2">Usage {html.escape(period)}</h1>'
        f'<p class="text-body-secondary">Signed in as {html.escape(str(user.get("name", "")))}. '
        f"{html.escape(scope)} Hours are wall-clock hours times the resource held "
        "(memory in decimal GB).</p>"
        f"{charts}"
        f'<h2 class="h4">Totals</h2>{totals_table(summary, by, period)}'
        f'<p><a class="btn btn-sm btn-outline-secondary" href="{csv_href}">CSV</a> '
        f'<a class="btn btn-sm btn-outline-secondary" href="{json_href}">JSON</a></p>'
    )
    return render_service_page(nav or HubNav(), user, f"Usage {period}", body, head=STYLE)
