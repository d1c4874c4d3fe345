"""The usage page's pure parts: charts only for what was used, one way of writing hours."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from labfleet_accounting.reports import format_hours, nice_ceiling, series_svg, summarize
from labfleet_accounting.usage_page import render_usage_page
from labfleet_hub.service_page import HubNav

DAY = 86400
DEC = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())


def series(cpu: list[float], gpu: list[float] | None = None) -> list[dict]:
    gpu = gpu or [0.0] * len(cpu)
    return [
        {
            "start": DEC + i * DAY,
            "end": DEC + (i + 1) * DAY,
            "gpu_hours_interactive": g,
            "gpu_hours_batch": 0.0,
            "cpu_core_hours_interactive": c,
            "cpu_core_hours_batch": 0.0,
        }
        for i, (c, g) in enumerate(zip(cpu, gpu, strict=True))
    ]


def alice_summary(cpu_seconds: float, gpu_seconds: float = 0.0):
    row = {
        "user_name": "alice", "group_name": "ml", "kind": "interactive",
        "accelerator": "t4" if gpu_seconds else "",
        "accelerator_kind": "gpu" if gpu_seconds else "",
        "gpu_fraction": 1.0, "seconds": cpu_seconds, "device_seconds": gpu_seconds,
        "cpu_seconds": cpu_seconds, "memory_byte_seconds": cpu_seconds * 2 * 2**30,
        "intervals": 1,
    }  # fmt: skip
    return summarize([row], "user")


def page(summary, points, **kw):
    return render_usage_page(
        {"name": "alice"}, "2026-12", "Your own usage.", summary, points, "user", **kw
    )


@pytest.mark.parametrize(
    ("hours", "text"),
    [
        (0, "0"),
        (8 / 3600, "0.00222"),  # 8 core-seconds: the "0.00" of the old table
        (0.0417, "0.0417"),
        (1.25, "1.25"),
        (2.0, "2"),
        (12.5, "12.5"),
        (1250.4, "1250"),
        (5.555e-6, "0.00000556"),  # never an exponent
    ],
)
def test_hours_have_three_significant_digits(hours, text):
    assert format_hours(hours) == text


def test_axis_tops_are_round():
    assert [nice_ceiling(v) for v in (0.00222, 0.3, 1, 1.2, 7, 0)] == [0.005, 0.5, 1, 2, 10, 1]


def test_no_gpu_use_draws_no_gpu_chart():
    summary = alice_summary(8.0)
    html = page(summary, series([8 / 3600, 0.0, 0.0]))
    charts = dict(re.findall(r'<section class="chart" data-metric="(\w+)">(.*?)</section>', html))
    assert "<svg" not in charts["gpu_hours"]
    assert "No GPU use in 2026-12." in charts["gpu_hours"]
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in charts["cpu_core_hours"]
    # with GPU use the chart is drawn, on its own scale
    html = page(alice_summary(3600.0, 1800.0), series([1.0, 0, 0], [0.5, 0, 0]))
    charts = dict(re.findall(r'<section class="chart" data-metric="(\w+)">(.*?)</section>', html))
    assert 'data-metric="gpu_hours"' in charts["gpu_hours"] and "No GPU use" not in html


def test_nothing_used_says_so_instead_of_empty_charts():
    html = page({}, series([0.0, 0.0]))
    assert "<svg" not in html
    assert "No GPU use in 2026-12." in html and "No CPU use in 2026-12." in html
    assert "No use in 2026-12." in html.split('id="totals"', 1)[1]


def test_axis_and_table_use_the_same_units_and_precision():
    cpu = 8 / 3600  # alice's 8 core-seconds today
    html = page(alice_summary(8.0), series([cpu, 0.0, 0.0]))
    table = html.split('id="totals"', 1)[1].split("</table>", 1)[0]
    headers = re.findall(r'<th class="num">([^<]+)</th>', table)
    cells = re.findall(r'<td class="num">([^<]+)</td>', table)
    assert headers == ["GPU-h", "FPGA-h", "CPU core-h", "memory GB-h"]
    assert cells[2] == "0.00222"  # was "0.00"
    svg = html.split('data-metric="cpu_core_hours"', 2)[2]
    # the axis: the table's column header as its unit, round ticks written as the table writes
    assert re.search(r'<text class="unit"[^>]*>CPU core-h</text>', svg)
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', svg)
    assert ticks == ["0", "0.0025", "0.005"]  # was a top label of 0.00222
    # today's bar says the table's number, with the table's unit
    titles = re.findall(r"<title>([^<]+)</title>", svg)
    assert "2026-12-01 interactive: 0.00222 CPU core-h" in titles


def test_bars_stay_inside_the_axis():
    svg = series_svg(series([0.3, 0.1]), "cpu_core_hours", unit="CPU core-h", height=220)
    heights = [float(h) for h in re.findall(r'class="interactive"[^>]*height="([\d.]+)"', svg)]
    # top 0.5: 0.3 fills 60 % of the plot (220 - 24 - 18 = 178 px)
    assert heights == [pytest.approx(178 * 0.6, abs=0.1), pytest.approx(178 * 0.2, abs=0.1)]


def test_the_page_is_the_hub_s_page():
    html = render_usage_page(
        {"name": "bob", "admin": True}, "2026-12", "You see everything (platform admin).",
        {}, series([0.0]), "group", nav=HubNav("/hub/", ("accounting", "batch")),
        prefix="/services/accounting/",
    )  # fmt: skip
    assert '<link rel="stylesheet" href="/hub/static/css/style.min.css" />' in html
    assert '<a class="nav-link" href="/hub/home">Home</a>' in html
    assert '<a class="nav-link" href="/hub/admin">Admin</a>' in html
    assert '<a class="dropdown-item" href="/services/batch/">batch</a>' in html
    assert 'id="dark-theme-toggle"' in html and 'href="/hub/logout"' in html
    assert (
        'href="/services/accounting/api/usage?period=2026-12&amp;by=group&amp;format=csv"' in html
    )
