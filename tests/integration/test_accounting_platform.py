"""Accounting on the single-node platform: spawner -> spool -> ledger -> the page in Chromium.

``labfleet up`` runs the accounting service as a hub-managed service (the
``accounting:`` section of config/labfleet.yaml); the local spawner's
SpoolHook records alice's server, and the page at /services/accounting/
shows each user only what they may see.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.error
import urllib.request

from labfleet_accounting.reports import format_hours, nice_ceiling, series_total
from labfleet_accounting.usage_page import format_duration

from .conftest import assert_hub_layout, login, screenshot
from .test_platform_login import start_server, stop_server, wait_for_lab

SERVICE = "/services/accounting/"


def ledger_rows(platform, user: str) -> list[dict]:
    path = platform.state_dir / "accounting.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute("SELECT * FROM usage_interval WHERE user_name = ?", (user,))
            return [dict(r) for r in rows]
        except sqlite3.OperationalError:  # not migrated yet
            return []


def wait_for_closed_interval(platform, user: str, after: int, timeout=30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        closed = [r for r in ledger_rows(platform, user) if r["end_s"] and r["start_s"] >= after]
        if closed:
            return closed[-1]
        time.sleep(0.3)
    rows = ledger_rows(platform, user)
    raise AssertionError(f"no closed interval of {user} in the ledger: {rows}")


def open_usage_page(page, platform, query: str = ""):
    page.goto(f"{platform.url}{SERVICE}{query}")
    # the first visit goes through the hub's OAuth (no confirmation page for this service)
    page.wait_for_url(re.compile(re.escape(SERVICE)))
    page.wait_for_selector("h1")
    return page


def json_in_page(page, platform, path: str) -> tuple[int, dict]:
    response = page.goto(f"{platform.url}{SERVICE}{path}")
    return response.status, json.loads(page.inner_text("body"))


def test_local_server_is_accounted_and_shown_to_the_right_people(platform, browser):
    before = int(time.time()) - 1
    alice = browser.new_context().new_page()
    alice.set_default_timeout(60_000)
    login(alice, platform, "alice", "alice-pass")
    alice.wait_for_url(re.compile(r"/hub/"))
    # the hub lists the service in its Services menu
    alice.goto(f"{platform.url}/hub/home")
    assert alice.locator(f"a[href$='{SERVICE}']").count() >= 1
    start_server(alice, platform, "cpu", image="scipy", size="small")
    wait_for_lab(alice)
    time.sleep(2)  # a measurable interval
    stop_server(platform, alice, "alice")

    row = wait_for_closed_interval(platform, "alice", before)
    assert (row["source"], row["uid"], row["kind"], row["profile"]) == (
        "local",
        "alice/",
        "interactive",
        "cpu",
    )
    # alice's groups are users and ml; the cpu profile grants nothing: first group
    assert row["group_name"] == "ml"
    assert row["accelerator"] == "" and row["accelerator_count"] == 0
    assert row["cpu"] == 1.0 and row["memory"] == 2 * 2**30  # the "small" size
    assert before <= row["start_s"] < row["end_s"] <= time.time() + 1
    assert row["end_s"] - row["start_s"] >= 2

    # alice sees her own usage, with the charts, in the hub's layout (the screenshot test)
    alice.set_viewport_size({"width": 1280, "height": 900})
    open_usage_page(alice, platform)
    screenshot(alice, "accounting-usage")
    assert_hub_layout(alice, "alice")
    assert "Your own usage." in alice.inner_text("body")
    assert alice.locator("#totals td", has_text=re.compile(r"^alice$")).count() == 1
    # below the totals, the session itself: newest first, hours written as everywhere
    session = alice.locator("#recent tbody tr.interval").first
    texts = session.locator("td").all_inner_texts()
    assert texts[:5] == ["interactive", "default server", "alice", "ml", "cpu"]
    assert texts[7] == format_duration(row["end_s"] - row["start_s"]), texts
    cpu_hours = row["cpu"] * (row["end_s"] - row["start_s"]) / 3600
    assert texts[8] == format_hours(cpu_hours)
    status, body = json_in_page(alice, platform, "api/usage/recent")
    assert status == 200 and {e["user"] for e in body["recent"]} == {"alice"}
    assert body["recent"][0]["start"] == row["start_s"] and body["recent"][0]["uid"] == "alice/"
    open_usage_page(alice, platform)
    # a CPU session: no GPU chart (it was an empty one on a 0..1 axis), the CPU chart
    gpu = alice.locator('section[data-metric="gpu_hours"]')
    assert gpu.locator("svg").count() == 0 and "No GPU use in " in gpu.inner_text()
    cpu = alice.locator('section[data-metric="cpu_core_hours"] svg')
    assert cpu.count() == 1
    bars = cpu.locator("rect.interactive")
    heights = [float(bars.nth(i).get_attribute("height")) for i in range(bars.count())]
    assert max(heights) > 0, "today's CPU bar is empty"
    # the axis and the table write hours alike: the table's unit, round ticks, 3 digits
    status, body = json_in_page(alice, platform, "api/usage")
    assert status == 200 and body["usage"]["alice"]["interactive"]["intervals"] >= 1
    used = body["usage"]["alice"]["interactive"]["cpu_core_hours"]
    _, series = json_in_page(alice, platform, "api/usage/series")
    top = nice_ceiling(max(series_total([p], "cpu_core_hours") for p in series["series"]))
    open_usage_page(alice, platform)
    headers = alice.locator("#totals th.num").all_inner_texts()
    cells = alice.locator("#totals tbody tr").first.locator("td.num").all_inner_texts()
    assert cells[headers.index("CPU core-h")] == format_hours(used) != "0.00"
    assert cpu.locator("text.unit").text_content() == "CPU core-h"
    ticks = cpu.locator("text.tick").all_text_contents()
    assert ticks == [format_hours(0), format_hours(top / 2), format_hours(top)]
    # the hub's dark mode: the charts' text follows it
    alice.click("#dark-theme-toggle")
    assert alice.get_attribute("html", "data-bs-theme") == "dark"
    screenshot(alice, "accounting-usage-dark")
    alice.click("#dark-theme-toggle")

    # bob does not see alice's rows, and is refused when he asks for them
    bob_context = browser.new_context()
    bob = bob_context.new_page()
    bob.set_default_timeout(60_000)
    login(bob, platform, "bob", "bob-pass")
    bob.wait_for_url(re.compile(r"/hub/"))
    open_usage_page(bob, platform)
    assert "alice" not in bob.inner_text("#totals")
    assert "alice" not in bob.inner_text("#recent")
    status, body = json_in_page(bob, platform, "api/usage?user=alice")
    assert status == 403 and "you may see your own usage only" in body["message"]
    status, body = json_in_page(bob, platform, "api/usage?group=ml&by=user")
    assert status == 403
    bob_context.close()

    # made admin of group ml (member of ml-admins), bob sees the group, alice included
    platform.set_groups("bob", ["ai-infn/users", "ai-infn/cms", "ai-infn/ml-admins"])
    try:
        admin_context = browser.new_context()
        admin = admin_context.new_page()
        admin.set_default_timeout(60_000)
        login(admin, platform, "bob", "bob-pass")
        admin.wait_for_url(re.compile(r"/hub/"))
        open_usage_page(admin, platform, "?group=ml")
        assert "Group ml." in admin.inner_text("body")
        assert admin.locator("#totals td", has_text=re.compile(r"^ml$")).count() >= 1
        status, body = json_in_page(admin, platform, "api/usage?group=ml&by=user")
        assert status == 200 and "alice" in body["usage"]
        # ... but not another group
        status, _ = json_in_page(admin, platform, "api/usage?group=cms-other&by=user")
        assert status == 403
        admin_context.close()
    finally:
        platform.set_groups("bob", ["ai-infn/users", "ai-infn/cms"])
        restore = browser.new_context()
        page = restore.new_page()
        login(page, platform, "bob", "bob-pass")  # the hub mirrors groups at login
        page.wait_for_url(re.compile(r"/hub/"))
        restore.close()
    assert platform.hub_groups("bob") == {"users", "cms"}
    assert platform.running_servers("alice") == 0
    alice.context.close()


def test_metrics_need_the_generated_token(platform):
    # issue 10: /services/accounting/metrics answered 200 without credentials, with every
    # group's usage, to anyone who reached the proxy
    url = f"{platform.url}{SERVICE}metrics"

    def get(headers=None):
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    status, body = get()
    assert status == 401 and "labfleet_" not in body
    status, body = get({"Authorization": "Bearer not-the-token"})
    assert status == 403 and "labfleet_" not in body
    token = (platform.state_dir / "secrets" / "accounting-metrics-token").read_text().strip()
    status, body = get({"Authorization": f"Bearer {token}"})
    assert status == 200 and "labfleet_running_sessions" in body
