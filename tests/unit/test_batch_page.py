"""The batch queue page's pure parts: usage from records, the SVG bars, the HTML."""

from __future__ import annotations

import re

from labfleet_batch.model import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord
from labfleet_batch.page import (
    BAR_WIDTH,
    GIB,
    LOG_TAIL_BYTES,
    MAX_ROWS,
    POSITION_READS,
    group_usage,
    render_job_page,
    render_page,
    with_positions,
)
from labfleet_batch.queues import GroupQuota
from labfleet_hub.service_page import HubNav

QUOTA = GroupQuota("ml", cpu=8, memory="32Gi", accelerators={"t4": 2, "a100": 1}, max_running=4)


def job(name, state=RUNNING, user="alice", group="ml", **kw) -> JobRecord:
    return JobRecord(name=name, group=group, user=user, state=state, **kw)


def bars(page: str) -> dict[str, tuple[float, str]]:
    """resource -> (filled width, label) from the rendered SVG."""
    found = {}
    for resource, width, label in re.findall(
        r'data-resource="([^"]+)"[^>]*width="([\d.]+)"[^>]*><title>([^<]*)</title>', page
    ):
        found[resource] = (float(width), label)
    return found


def test_bars_are_used_over_quota():
    records = [
        job("a", accelerator="t4", count=1),
        job("b", accelerator="t4", count=1, user="bob"),  # a member's job counts, unnamed
        job("c", state=QUEUED, accelerator="a100", count=1),
        job("d", state=SUCCEEDED, accelerator="a100", count=1),
        job("e", offload=True),  # offloaded: the offload queue's, not the group's
    ]
    usage = group_usage("ml", QUOTA, records, {"cpu": 2, "memory": 8 * GIB})
    assert (usage.running, usage.waiting) == (2, 1)
    page = render_page("alice", [usage], [])
    drawn = bars(page)
    assert drawn["CPU"] == (BAR_WIDTH * 2 / 8, "CPU: 2 / 8")
    assert drawn["memory"] == (BAR_WIDTH * 8 / 32, "memory: 8 / 32 GiB")
    assert drawn["t4"] == (BAR_WIDTH, "t4: 2 / 2")  # full
    assert drawn["a100"] == (0.0, "a100: 0 / 1")
    assert drawn["running jobs"] == (BAR_WIDTH * 2 / 4, "running jobs: 2 / 4")
    assert "2 running, 1 waiting" in page
    # bob's job is only a number here: no row, no name
    assert ">b<" not in page and "bob" not in page


def test_parallel_pods_hold_count_each_and_unknown_sizes_say_so():
    usage = group_usage("ml", QUOTA, [job("p", accelerator="t4", count=1, parallelism=2)])
    drawn = bars(render_page("alice", [usage], []))
    assert drawn["t4"][1] == "t4: 2 / 2"
    # without the backend's sums the size is unknown: an empty bar, not a guess
    assert drawn["CPU"] == (0.0, "CPU: ? / 8")


def test_known_use_with_nothing_running_is_zero_not_unknown():
    # the local backend's sums leave out what no running job holds: {} is "nothing"
    drawn = bars(render_page("alice", [group_usage("ml", QUOTA, [], {})], []))
    assert drawn["CPU"] == (0.0, "CPU: 0 / 8")
    assert drawn["memory"] == (0.0, "memory: 0 / 32 GiB")
    half = group_usage("ml", QUOTA, [job("a")], {"cpu": 0.5, "jobs": 1})
    drawn = bars(render_page("alice", [half], []))
    assert drawn["CPU"] == (BAR_WIDTH * 0.5 / 8, "CPU: 0.5 / 8")
    assert drawn["memory"][1] == "memory: 0 / 32 GiB"


def test_waiting_jobs_show_their_position():
    own = [
        job("run", created="2025-01-01T00:00:00Z", accelerator="t4", count=1),
        job(
            "wait",
            state=QUEUED,
            created="2025-01-01T00:00:01Z",
            queue={"position": 2, "pending_in_queue": 3},
        ),
    ]
    page = render_page("alice", [], own)
    rows = re.findall(r'<tr class="job state-(\w+)" data-id="([^"]+)">(.*?)</tr>', page)
    # newest first
    assert [(s, i) for s, i, _ in rows] == [("queued", "ml/wait"), ("running", "ml/run")]
    assert '<td class="position">2 of 3</td>' in rows[0][2]
    assert '<td class="position"></td>' in rows[1][2]
    assert "t4 &times; 1" in rows[1][2]


def test_jobs_show_the_name_their_owner_gave_and_their_id():
    own = [
        job("train-x1y2z3w4", display_name="train", created="2025-01-01T00:00:00Z"),
        job("old-name-only"),  # a record without a display name: its job name
    ]
    page = render_page("alice", [], own)
    names = re.findall(r'<a class="job-name[^"]*" href="[^"]*">([^<]*)</a>', page)
    ids = re.findall(r'<small class="job-id[^"]*">([^<]*)</small>', page)
    assert names == ["train", "old-name-only"]
    assert ids == ["ml/train-x1y2z3w4", "ml/old-name-only"]


def test_a_failed_job_says_why_and_links_to_its_logs():
    why = "completion 0 (exit code 2) exited non-zero; see the logs"
    own = [
        job("fit-a1", FAILED, display_name="fit", message=why, created="2025-01-01T00:00:02Z"),
        job("stop-b2", CANCELLED, message="cancelled by request", created="2025-01-01T00:00:01Z"),
        job(
            "wait-c3",
            QUEUED,
            queue={"position": 1, "pending_in_queue": 1, "message": "insufficient quota for cpu"},
            created="2025-01-01T00:00:00Z",
        ),
    ]
    page = render_page("alice", [], own, prefix="/services/batch/")
    rows = dict(re.findall(r'<tr class="job state-\w+" data-id="([^"]+)">(.*?)</tr>', page))
    failed = rows["ml/fit-a1"]
    assert '<span class="badge text-bg-danger">failed</span>' in failed
    assert f'<td class="reason small">{why}</td>' in failed
    assert '<td class="logs"><a href="/services/batch/jobs/ml/fit-a1">logs</a></td>' in failed
    assert "cancelled by request" in rows["ml/stop-b2"]
    # a waiting job says why it waits; it has no log yet, only its page
    assert "insufficient quota for cpu" in rows["ml/wait-c3"]
    assert '<a href="/services/batch/jobs/ml/wait-c3">details</a>' in rows["ml/wait-c3"]


def test_the_job_page_shows_the_reason_and_a_completion_s_log():
    record = job(
        "fit-a1", FAILED, display_name="fit", message="completion 1 (exit code 2) exited",
        completions=3, failed=1, succeeded=2, profile="cpu", workdir="/home/alice/batch/fit-a1",
    )  # fmt: skip
    log = "python: can't open file 'fit.py': <No such file>\n"
    page = render_job_page("alice", record, 1, log, prefix="/services/batch/")
    assert '<h1 class="h2 job-name">fit</h1>' in page
    assert "completion 1 (exit code 2) exited" in page
    assert "can&#x27;t open file &#x27;fit.py&#x27;: &lt;No such file&gt;" in page  # escaped
    # one link per completion, the shown one active; back to the queue
    assert re.findall(r'href="/services/batch/jobs/ml/fit-a1\?index=(\d)"', page) == [
        "0", "1", "2"
    ]  # fmt: skip
    active = re.findall(r'<li class="page-item active"><a class="page-link" href="([^"]+)">', page)
    assert active == ["/services/batch/jobs/ml/fit-a1?index=1"]
    assert 'href="/services/batch/">&larr; Batch queue</a>' in page
    assert 'http-equiv="refresh"' not in page  # finished: nothing changes any more
    # a queued job has no log yet: the page says why, and reloads
    waiting = job("w", QUEUED, queue={"position": 2, "pending_in_queue": 2})
    page = render_job_page("alice", waiting, 0, None, "completion 0 has not started yet")
    assert "No log yet: completion 0 has not started yet" in page
    assert '<meta http-equiv="refresh" content="10">' in page
    # a long log: its end, and a note
    page = render_job_page("alice", record, 0, "x" * (LOG_TAIL_BYTES + 10) + "END")
    assert "END</pre>" in page and f"The last {LOG_TAIL_BYTES // 1024} KiB" in page


def test_the_pages_are_the_hub_s_pages():
    nav = HubNav("/jh/hub/", ("accounting", "batch"))
    for page in (
        render_page({"name": "alice", "admin": False}, [], [], nav=nav),
        render_job_page({"name": "alice"}, job("j"), 0, "", nav=nav),
    ):
        # the hub's stylesheet, scripts (Bootstrap, dark mode) and navigation bar
        assert '<link rel="stylesheet" href="/jh/hub/static/css/style.min.css" />' in page
        assert 'src="/jh/hub/static/js/darkmode.js"' in page
        assert '<nav class="navbar navbar-expand-sm bg-body-tertiary mb-4">' in page
        assert '<a class="nav-link" href="/jh/hub/home">Home</a>' in page
        assert '<a class="nav-link" href="/jh/hub/token">Token</a>' in page
        assert 'href="/jh/hub/admin"' not in page  # not an admin
        assert '<a class="dropdown-item" href="/jh/services/accounting/">accounting</a>' in page
        assert '<a class="dropdown-item" href="/jh/services/batch/">batch</a>' in page
        assert 'id="dark-theme-toggle"' in page
        assert '<span class="me-1">alice</span>' in page
        assert 'id="logout"' in page and 'href="/jh/hub/logout"' in page
    admin = render_page({"name": "carol", "admin": True}, [], [], nav=nav)
    assert '<a class="nav-link" href="/jh/hub/admin">Admin</a>' in admin


def test_user_strings_are_escaped():
    evil = "<script>alert(1)</script>"
    usage = group_usage('g"<b>', GroupQuota('g"<b>', cpu=1, memory="1Gi"), [])
    page = render_page("<i>me</i>", [usage], [job("x", display_name=evil, group='g"<b>')])
    assert "<script>" not in page and "<b>" not in page and "<i>me" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'data-group="g&quot;&lt;b&gt;"' in page


def test_empty_state():
    page = render_page("carol", [], [])
    assert "You are in no batch group." in page
    assert "No jobs." in page
    assert "All jobs of group" not in page and "<svg" not in page


def test_group_admin_sees_the_groups_jobs():
    group_jobs = [job("mine"), job("theirs", user="bob", display_name="bobs-run")]
    page = render_page(
        "alice", [group_usage("ml", QUOTA, group_jobs)], [job("mine")], {"ml": group_jobs}
    )
    assert "All jobs of group ml" in page
    admin = page.split("All jobs of group ml", 1)[1]
    assert "<td>bob</td>" in admin and "bobs-run" in admin
    assert "bobs-run" not in page.split("All jobs of group ml", 1)[0]


def test_rows_are_capped():
    many = [
        job(f"j{i:03d}", created=f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z") for i in range(80)
    ]
    page = render_page("alice", [], many)
    assert page.count('<tr class="job') == MAX_ROWS
    assert 'data-id="ml/j079"' in page and 'data-id="ml/j000"' not in page


async def test_positions_missing_from_a_list_are_read_per_job_within_a_bound():
    class Backend:
        reads: list[str] = []

        async def get(self, group, name):
            self.reads.append(name)
            if name == "broken":
                raise RuntimeError("API server down")
            return job(name, state=QUEUED, queue={"position": 2, "pending_in_queue": 12})

    listed = [job("run"), job("broken", state=QUEUED)] + [
        job(f"w{i}", state=QUEUED) for i in range(POSITION_READS + 2)
    ]
    backend = Backend()
    out = await with_positions(backend, listed)
    # running jobs are not read; at most POSITION_READS waiting ones are
    assert backend.reads == ["broken"] + [f"w{i}" for i in range(POSITION_READS - 1)]
    assert out[0] is listed[0] and out[1] is listed[1]  # a failed read keeps the record
    assert out[2].queue["position"] == 2
    assert out[-1].queue.get("position") is None
    page = render_page("alice", [], out, {})
    assert "2 of 12" in page
