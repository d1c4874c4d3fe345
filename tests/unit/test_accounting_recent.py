"""The usage page's "Recent sessions and jobs": what each interval was, and the table (pure)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from labfleet_accounting.reports import (
    Weights,
    describe_interval,
    format_hours,
    interval_what,
    kube_job_name,
)
from labfleet_accounting.usage_page import format_duration, recent_table, render_usage_page
from labfleet_hub.service_page import HubNav

T = int(datetime(2026, 12, 3, 9, 30, 5, tzinfo=UTC).timestamp())


def row(**kw) -> dict:
    """A ledger row as query_recent returns it."""
    base = {
        "source": "local", "uid": "alice/", "kind": "interactive", "user_name": "alice",
        "group_name": "ml", "profile": "cpu", "accelerator": "", "accelerator_kind": "",
        "accelerator_count": 0, "gpu_fraction": 1.0, "cpu": 1.0, "memory": 2 * 10**9,
        "namespace": "", "name": "", "start_s": T, "end_s": T + 2,
    }  # fmt: skip
    return {**base, **kw}


def cells(html: str) -> list[list[str]]:
    """The body rows of the #recent table, each cell's text (tags stripped, still escaped)."""
    body = html.split('id="recent"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [
        [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
        for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body)
    ]


@pytest.mark.parametrize(
    ("pod", "job"),
    [
        ("train-x7k2m9qp-0-abcde", "train-x7k2m9qp"),
        ("train-2-x7k2m9qp-12-b2c4d", "train-2-x7k2m9qp"),  # digits in the name, index 12
        ("jupyter-alice", "jupyter-alice"),  # not a Job's pod: the name as it is
        ("", ""),
    ],
)
def test_kube_job_name_from_its_pod(pod, job):
    assert kube_job_name(pod) == job


def test_what_each_interval_was():
    # local batch: the ledger uid is the job id
    assert interval_what(row(source="local-batch", uid="ml/train-x7k2m9qp", kind="batch",
                             name="train-x7k2m9qp")) == "ml/train-x7k2m9qp"  # fmt: skip
    # Kubernetes batch: the Job's name from its pod's, as the same job id
    kube = row(source="k8s", uid="0b6c-pod-uid", kind="batch", name="train-x7k2m9qp-0-abcde")
    assert interval_what(kube) == "ml/train-x7k2m9qp"
    # notebook servers: the server, on Kubernetes its pod
    assert interval_what(row()) == "default server"
    assert interval_what(row(uid="alice/gpu", name="gpu")) == "gpu"
    assert interval_what(row(source="k8s", uid="9f1e", name="jupyter-alice")) == "jupyter-alice"


def test_an_interval_s_hours_are_weighted_like_the_totals():
    mig = row(source="k8s", kind="batch", accelerator="mig-1g.10gb", accelerator_kind="mig",
              accelerator_count=2, gpu_fraction=0.125, cpu=4.0, memory=8 * 10**9,
              end_s=T + 3 * 3600, name="j-abcdefgh-0-xxxxx")  # fmt: skip
    entry = describe_interval(mig, Weights(), now=T + 10**6)
    assert entry["what"] == "ml/j-abcdefgh" and entry["running"] is False
    assert (entry["seconds"], entry["cpu_core_hours"], entry["memory_gb_hours"]) == (
        3 * 3600,
        12.0,
        24.0,
    )
    assert entry["gpu_hours"] == 0.75 and entry["fpga_hours"] == 0.0  # 2 x 1/8 x 3 h
    assert describe_interval(mig, Weights(mig="whole"))["gpu_hours"] == 6.0
    fpga = describe_interval(row(accelerator="u55c", accelerator_kind="fpga", accelerator_count=1,
                                 end_s=T + 3600))  # fmt: skip
    assert (fpga["gpu_hours"], fpga["fpga_hours"]) == (0.0, 1.0)
    # a running one: up to now, and says so
    running = describe_interval(row(end_s=None), Weights(), now=T + 1800)
    assert running["running"] and running["end"] is None and running["seconds"] == 1800
    assert running["cpu_core_hours"] == 0.5


def test_the_table_writes_what_each_one_was_and_used():
    entries = [
        describe_interval(row(end_s=None), now=T + 90),
        describe_interval(row(source="local-batch", uid="ml/train-x7k2m9qp", kind="batch",
                              profile="a100", accelerator="a100", accelerator_kind="gpu",
                              accelerator_count=2, cpu=8.0, end_s=T + 2 * 3600 + 300)),
        describe_interval(row(start_s=T - 100, end_s=T - 92)),
    ]  # fmt: skip
    html = recent_table(entries, "2026-12")
    head = re.findall(r"<th[^>]*>([^<]+)</th>", html.split("<tbody>")[0])
    assert head == ["kind", "what", "user", "group", "profile", "accelerator", "started",
                    "duration", "CPU core-h", "memory GB-h", "GPU-h"]  # fmt: skip
    running, job, short = cells(html)
    assert running[:8] == ["interactive", "default server", "alice", "ml", "cpu", "&mdash;",
                           "2026-12-03 09:30 UTC", "running"]  # fmt: skip
    assert running[8] == format_hours(90 / 3600) == "0.025"  # so far
    assert job == ["batch", "ml/train-x7k2m9qp", "alice", "ml", "a100", "a100 &times; 2",
                   "2026-12-03 09:30 UTC", "2 h 5 min", "16.7", format_hours(2 * 2.0833333),
                   "4.17"]  # fmt: skip
    # a few core-seconds are not "0.00": the page's one way of writing hours
    assert short[7:9] == ["8 s", "0.00222"]
    assert '<time datetime="2026-12-03T09:30:05Z">' in html
    assert re.search(r'<tr class="interval kind-interactive running">', html)


def test_hostile_names_are_text_not_html():
    evil = '<img src=x onerror="alert(1)">'
    entry = describe_interval(row(source="local-batch", kind="batch", uid=f"ml/{evil}",
                                  user_name=f"{evil}&amp;", group_name='ml"><script>',
                                  profile="</td><td>p", accelerator="<b>a100</b>",
                                  accelerator_kind="gpu", accelerator_count=1))  # fmt: skip
    html = recent_table([entry], "2026-12")
    assert "<img" not in html and "<script" not in html and "<b>" not in html
    assert "</td><td>p" not in html
    assert "ml/&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;amp;" in html  # no double meaning
    # still one row of eleven cells: nothing broke out of its cell
    assert [len(r) for r in cells(html)] == [11]
    page = render_usage_page({"name": "alice"}, "2026-12", "Your own usage.", {}, [], "user",
                             recent=[entry], recent_limit=50)  # fmt: skip
    assert "<img src=x" not in page and "<script>" not in page.split('id="recent"', 1)[1]


def test_nothing_recent_and_the_limit():
    html = recent_table([], "2026-12", 50)
    assert "No sessions or jobs in 2026-12." in html and "The latest" not in html
    full = recent_table([describe_interval(row())] * 3, "2026-12", 3)
    assert "The latest 3; older ones count in the totals above." in full


def test_the_page_has_the_recent_table_below_the_totals():
    page = render_usage_page(
        {"name": "alice"}, "2026-12", "Group ml.", {}, [], "group", group="ml",
        nav=HubNav("/hub/", ("accounting",)), prefix="/services/accounting/",
        recent=[describe_interval(row())], recent_limit=50,
    )  # fmt: skip
    assert page.index('id="totals"') < page.index("Recent sessions and jobs")
    assert page.index("Recent sessions and jobs") < page.index('id="recent"')
    assert 'href="/services/accounting/api/usage/recent?period=2026-12&amp;group=ml"' in page
    hidden = render_usage_page({"name": "alice"}, "2026-12", "x", {}, [], "user", recent_limit=0)
    assert 'id="recent"' not in hidden and "Recent sessions" not in hidden


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (8, "8 s"), (60, "1 min"), (725, "12 min 5 s"), (3600, "1 h"),
     (7500, "2 h 5 min"), (3 * 86400 + 4 * 3600 + 59, "3 d 4 h")],
)  # fmt: skip
def test_durations(seconds, text):
    assert format_duration(seconds) == text
