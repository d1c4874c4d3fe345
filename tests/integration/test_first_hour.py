"""A researcher's first session, as a person goes through it in a real browser:
log in, start a notebook, run the README's batch example from a notebook cell and
from a JupyterLab terminal, see both succeed, and find them on the usage page as
batch use. Each step once failed for a new user (issue 9).

Sync tests only: Playwright's sync API runs a loop in this module's thread.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import yaml
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from .conftest import login
from .test_platform_login import start_server, stop_server, wait_for_lab

README_EXAMPLE = 'labfleet-batch submit --group ml -- python -c "print(42)"'
JOB_ID = re.compile(r"\bml/[a-z0-9-]+-[a-z0-9]{8}\b")
SHOTS = Path(os.environ.get("LABFLEET_SCREENSHOTS", "/tmp/labfleet-screenshots"))


def home_of(platform, user: str) -> Path:
    values = yaml.safe_load((platform.config_dir / "labfleet.yaml").read_text())
    return Path(values["spawner"]["storage_root"]) / "home" / user


def run_cell(page, code: str, expect: re.Pattern, timeout: float = 120) -> str:
    """Type ``code`` into the notebook's last cell, run it, return its output text.

    A run asked for while the kernel is still connecting is dropped by JupyterLab
    (the prompt stays ``[ ]``): asked again, as a person would.
    """
    cell = page.locator(".jp-Notebook .jp-Cell").last
    cell.locator(".cm-content").click()
    page.keyboard.type(code)
    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(5):
        cell.locator(".cm-content").click()
        page.keyboard.press("Control+Enter")
        try:
            page.wait_for_function(
                "e => !/\\[\\s*\\]/.test(e.innerText)", arg=prompt.element_handle(), timeout=15_000
            )
            break
        except PlaywrightTimeout:
            continue
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = "\n".join(cell.locator(".jp-OutputArea-output").all_inner_texts())
        if expect.search(text):
            # the next cell, for the next run
            page.keyboard.press("Escape")
            page.keyboard.press("b")
            return text
        time.sleep(0.3)
    page.screenshot(path=str(SHOTS / "first-hour-cell-failed.png"))
    raise AssertionError(f"no {expect.pattern!r} in the cell output within {timeout} s:\n{text}")


def wait_for_file(path: Path, expect: re.Pattern, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if expect.search(text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"no {expect.pattern!r} in {path} within {timeout} s:\n{text}")


def test_researchers_first_hour(platform, page):
    SHOTS.mkdir(parents=True, exist_ok=True)
    login(page, platform, "alice", "alice-pass")
    page.wait_for_url(re.compile(r"/hub/spawn"))
    start_server(page, platform, "cpu", image="scipy", size="small")
    wait_for_lab(page)
    try:
        # -- a notebook cell: the README's example, then wait and read its log
        page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
        page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content")
        page.wait_for_selector(".jp-StatusBar-Widget:has-text('| Idle')")
        out = run_cell(page, "!" + README_EXAMPLE, JOB_ID)
        from_cell = JOB_ID.search(out).group(0)
        out = run_cell(
            page,
            f"!labfleet-batch wait {from_cell} && labfleet-batch logs {from_cell}",
            re.compile(r"succeeded[\s\S]*\n42\b|failed"),
        )
        page.screenshot(path=str(SHOTS / "first-hour-cell.png"))
        assert f"{from_cell}: succeeded" in out and re.search(r"^42$", out, re.M), out

        # -- a terminal: the same example; the prompt and whoami know the user's name
        page.locator(".lm-MenuBar-itemLabel", has_text="File").click()
        page.locator(".lm-Menu-item[data-type='submenu']", has_text="New").first.hover()
        page.locator(".lm-Menu-item[data-command='terminal:create-new']").click()
        terminal = page.locator(".jp-Terminal").last
        terminal.wait_for()
        terminal.click()
        time.sleep(1.0)  # the shell reads its profile before it takes input
        report = home_of(platform, "alice") / "first-hour-terminal.txt"
        page.keyboard.type(
            f"{{ whoami; id -gn; command -v labfleet-batch; {README_EXAMPLE}; }} "
            f"> {report.name} 2>&1\n"
        )
        text = wait_for_file(report, JOB_ID)
        lines = text.splitlines()
        assert lines[0] == "alice" and lines[1] == "alice", text  # not "I have no name!"
        assert lines[2].endswith("/labfleet-batch"), text
        from_terminal = JOB_ID.search(text).group(0)
        page.keyboard.type(
            f"labfleet-batch wait {from_terminal} > wait.txt 2>&1; "
            f"labfleet-batch logs {from_terminal} >> wait.txt\n"
        )
        waited = wait_for_file(report.with_name("wait.txt"), re.compile(r"\n42\n|failed"))
        page.screenshot(path=str(SHOTS / "first-hour-terminal.png"))
        assert f"{from_terminal}: succeeded" in waited and waited.endswith("\n42\n"), waited

        # -- the usage page shows alice's batch use (the jobs reach the ledger)
        deadline = time.monotonic() + 90
        rows = []
        while time.monotonic() < deadline:
            page.goto(f"{platform.url}/services/accounting/")
            page.wait_for_selector("table")
            rows = [r.split("\t") for r in page.locator("table tr").all_inner_texts()]
            if (
                any(r[:2] == ["alice", "batch"] for r in rows)
                and sum(r[:1] == ["batch"] for r in rows) >= 2
            ):
                break
            time.sleep(2)
        page.screenshot(path=str(SHOTS / "first-hour-usage.png"), full_page=True)
        assert any(r[:2] == ["alice", "batch"] for r in rows), rows
        # and each job by its id in the recent sessions and jobs, as batch use
        for job in (from_cell, from_terminal):
            assert any(r[:2] == ["batch", job] for r in rows), (job, rows)
    finally:
        stop_server(platform, page, "alice")
