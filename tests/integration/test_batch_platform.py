"""Batch jobs on the single-node platform: `labfleet up` runs the batch service.

Real login through the development IdP in Chromium, real hub tokens (the
token page, and the notebook server's own JUPYTERHUB_API_TOKEN), the real
``labfleet-batch`` CLI, jobs as local processes under the users' uids.
Sync tests only: Playwright's sync API runs a loop in this module's thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import assert_hub_layout, login, screenshot
from .test_platform_login import api_token, http, start_server, stop_server, wait_for_lab

CLI = str(Path(sys.executable).parent / "labfleet-batch")


def batch_url(platform) -> str:
    return f"{platform.url}/services/batch/"


def cli(platform, token: str, *args: str, stdin: str | None = None, url: str | None = None):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")},
        "JUPYTERHUB_API_TOKEN": token,
        "LABFLEET_BATCH_URL": url or batch_url(platform),
    }
    return subprocess.run(
        [CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


def storage_root(platform) -> Path:
    values = yaml.safe_load((platform.config_dir / "labfleet.yaml").read_text())
    return Path(values["spawner"]["storage_root"])


def expected_uid(platform, username: str) -> int:
    """The uid a job must run as: the notebook's mapped uid when the hub is root."""
    if os.geteuid() != 0:
        return os.geteuid()
    # the user's never-reused number (labfleet_hub.posix_registry), given at the first job
    [(number,)] = platform.query(
        "SELECT number FROM labfleet_posix_ids WHERE kind = 'user' AND name = ?", username
    )
    return 200000 + number


@contextlib.contextmanager
def signed_in(browser, platform, name: str):
    """A browser page with ``name`` logged in to the hub (demo password)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        login(page, platform, name, f"{name}-pass")
        page.wait_for_url(re.compile(r"/hub/"))
        yield page
    finally:
        context.close()


@pytest.fixture(scope="module")
def tokens(platform, browser):
    found = {}
    for name in ("alice", "bob"):
        with signed_in(browser, platform, name) as page:
            found[name] = api_token(page, platform)
    return found


def test_job_from_the_cli_runs_as_the_user_and_stays_private(platform, tokens):
    alice, bob = tokens["alice"], tokens["bob"]
    script = "echo hello from uid $(id -u) index $JOB_COMPLETION_INDEX\necho result > out.txt\n"
    submitted = cli(
        platform, alice, "submit", "--group", "ml", "--name", "hello", "-", stdin=script
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"ml/hello-[a-z0-9]{8}", job_id), submitted.stdout

    waited = cli(platform, alice, "wait", job_id)
    assert waited.returncode == 0, waited.stderr
    assert f"{job_id}: succeeded" in waited.stderr
    logs = cli(platform, alice, "logs", job_id)
    uid = expected_uid(platform, "alice")
    assert logs.stdout == f"hello from uid {uid} index 0\n", logs
    # the result is in alice's home on the shared storage, owned by her
    out = storage_root(platform) / "home" / "alice" / "batch" / job_id.split("/")[1] / "out.txt"
    assert out.read_text() == "result\n"
    assert out.stat().st_uid == uid

    # bob sees nothing of it: status, logs and cancel answer 404 like a missing job
    url = batch_url(platform)
    for method, path in (
        ("GET", f"api/jobs/{job_id}"),
        ("GET", f"api/jobs/{job_id}/logs?index=0"),
        ("DELETE", f"api/jobs/{job_id}"),
    ):
        status, body = http(method, url + path, bob)
        assert status == 404, (method, path, status, body)
        assert "alice" not in body and "hello from" not in body
    assert cli(platform, bob, "status", job_id).stdout.strip() == "failed"  # Snakemake: gone
    cancel = cli(platform, bob, "cancel", job_id)
    assert cancel.returncode == 2 and "no job" in cancel.stderr
    status, body = http("GET", url + "api/jobs", bob)
    assert status == 200 and job_id not in body
    # ... and the job is untouched for alice
    status, body = http("GET", url + f"api/jobs/{job_id}", alice)
    assert status == 200 and json.loads(body)["state"] == "succeeded"
    # bob may not submit to alice's group
    refused = cli(platform, bob, "submit", "--group", "ml", "--", "true")
    assert refused.returncode == 2 and "ml" in refused.stderr
    # no token, no service
    assert http("GET", url + "api/jobs")[0] == 401


def test_batch_use_reaches_the_accounting_ledger_and_report(platform, tokens):
    """`labfleet up` connects the local batch service to accounting (issue 9, item 4)."""
    from .test_accounting_platform import ledger_rows

    alice = tokens["alice"]
    submitted = cli(platform, alice, "submit", "--group", "ml", "--name", "charged",
                    "--", "sleep", "2")  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert cli(platform, alice, "wait", job_id).returncode == 0
    deadline = time.monotonic() + 30
    rows = []
    while time.monotonic() < deadline:  # the accounting service ingests every 0.5 s
        rows = [r for r in ledger_rows(platform, "alice") if r["uid"] == job_id]
        if rows and rows[0]["end_s"] is not None:
            break
        time.sleep(0.3)
    [row] = rows
    assert (row["source"], row["kind"], row["group_name"], row["name"]) == (
        "local-batch", "batch", "ml", job_id.split("/")[1],
    )  # fmt: skip
    assert row["end_s"] is not None and 2 <= row["end_s"] - row["start_s"] <= 6, row
    # the usage API counts it as alice's batch use
    status, body = http("GET", f"{platform.url}/services/accounting/api/usage", alice)
    assert status == 200, body
    batch = json.loads(body)["usage"]["alice"]["batch"]
    assert batch["intervals"] >= 1 and batch["cpu_core_hours"] > 0, batch


def test_notebook_token_and_url_reach_the_service(platform, page):
    login(page, platform, "alice", "alice-pass")
    page.wait_for_url(re.compile(r"/hub/spawn"))
    start_server(page, platform, "cpu", image="scipy", size="small")
    wait_for_lab(page)
    try:
        pids = subprocess.run(
            ["pgrep", "-f", "jupyterhub-singleuser"], capture_output=True, text=True
        ).stdout.split()
        environ = {}
        for pid in pids:
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "JUPYTERHUB_USER=alice\0" in raw:
                environ = dict(v.split("=", 1) for v in raw.split("\0") if "=" in v)
        assert environ, "alice's single-user server process not found"
        url, token = environ["LABFLEET_BATCH_URL"], environ["JUPYTERHUB_API_TOKEN"]
        assert url == batch_url(platform)
        # the notebook's own server token is accepted (the scope is in server_token_scopes)
        status, body = http("GET", url + "api/info", token)
        assert status == 200, body
        info = json.loads(body)
        assert info["user"] == "alice" and set(info["groups"]) == {"ml"}
        done = cli(platform, token, "submit", "--group", "ml", "--", "true", url=url)
        assert done.returncode == 0, done.stderr
        assert cli(platform, token, "wait", done.stdout.strip(), url=url).returncode == 0
    finally:
        stop_server(platform, page, "alice")


def test_queue_page_draws_the_queue_through_the_hub_login(platform, tokens, browser):
    """The batch page's screenshot test: the hub's layout, the queue, a failed job's log."""
    alice, bob = tokens["alice"], tokens["bob"]
    started = []

    def submit(name, *args):
        done = cli(platform, alice, "submit", "--group", "ml", "--name", name, *args)
        assert done.returncode == 0, done.stderr
        started.append(done.stdout.strip())
        return started[-1]

    # unnamed, and failing at once: it is named after its script, and says why it failed
    failed = cli(platform, alice, "submit", "--group", "ml", "--", "python3", "missing_train.py")
    assert failed.returncode == 0, failed.stderr
    failed = failed.stdout.strip()
    assert re.fullmatch(r"ml/missing-train-[a-z0-9]{8}", failed), failed
    assert cli(platform, alice, "wait", failed).returncode == 1
    try:
        # two medium pods hold all of ml's 8 CPU (config/labfleet.yaml), so the next one waits
        holder = submit(
            "hold", "--size", "medium", "--completions", "2", "--parallelism", "2",
            "--", "sleep", "60",
        )  # fmt: skip
        behind = submit("behind", "--size", "small", "--", "sleep", "60")
        status, body = http("GET", batch_url(platform) + f"api/jobs/{behind}", alice)
        assert status == 200 and json.loads(body)["state"] == "queued", body

        views = {}
        for name in ("alice", "bob"):
            with signed_in(browser, platform, name) as page:
                page.set_viewport_size({"width": 1280, "height": 900})
                # no token in the URL: the hub's OAuth signs the browser in to the service
                page.goto(batch_url(platform))
                page.wait_for_selector("h1:has-text('Batch queue')")
                assert page.url.rstrip("/") == batch_url(platform).rstrip("/"), page.url
                views[name] = page.content()
                if name == "alice":
                    screenshot(page, "batch-queue")
                assert_hub_layout(page, name)
                if name != "alice":
                    continue
                # the failed job links to its page: why, and the log that says so
                row = page.locator(f'tr[data-id="{failed}"]')
                assert row.locator("a.job-name").inner_text() == "missing-train"
                assert "exit code 2" in row.locator("td.reason").inner_text()
                row.get_by_role("link", name="logs").click()
                page.wait_for_selector("#job-log")
                assert "can't open file" in page.inner_text("#job-log")
                assert "missing_train.py" in page.inner_text("#job-log")
                screenshot(page, "batch-job-failed")
                assert_hub_layout(page, name)
                # the hub's dark mode works here too, and is the hub's (one stored theme)
                page.click("#dark-theme-toggle")
                assert page.get_attribute("html", "data-bs-theme") == "dark"
                page.goto(batch_url(platform))
                page.wait_for_selector("h1:has-text('Batch queue')")
                assert page.get_attribute("html", "data-bs-theme") == "dark"
                screenshot(page, "batch-queue-dark")
                page.goto(f"{platform.url}/hub/home")
                assert page.get_attribute("html", "data-bs-theme") == "dark"

        mine = views["alice"]
        assert re.search(rf'data-id="{holder}">.*?<td class="state"><span [^>]*>running<', mine)
        assert re.search(rf'data-id="{behind}">.*?<td class="position">1 of 1</td>', mine)
        group = mine.split('data-group="ml"', 1)[1]
        assert "1 running, 1 waiting" in group
        assert "<title>CPU: 8 / 8</title>" in group
        assert "<title>running jobs: 1 / 4</title>" in group

        theirs = views["bob"]
        assert 'data-group="cms"' in theirs and 'data-group="ml"' not in theirs
        assert holder not in theirs and behind not in theirs and failed not in theirs
        # single node: the use is known, and nothing of cms runs
        cms = theirs.split('data-group="cms"', 1)[1]
        assert "<title>CPU: 0 / 4</title>" in cms and "<title>memory: 0 / 16 GiB</title>" in cms
    finally:
        for job_id in reversed(started):
            cli(platform, alice, "cancel", job_id)
    # bob's token reaches the API, not alice's jobs: unchanged by the page
    status, body = http("GET", batch_url(platform) + "api/jobs", bob)
    assert status == 200 and not any(j in body for j in started)
