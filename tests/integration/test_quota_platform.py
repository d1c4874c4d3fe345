"""Group admins manage their group's quotas on a single node (issue 16), on the real platform.

`labfleet up` with two (fake-NVML) A100s; real logins through the development
IdP in Chromium; the accounting service's quota page and API, which change the
batch service's live limits through its API; real batch jobs under the users'
uids. Alice administers ml (ai-infn/ml-admins), bob is a member of ml only,
carol is the platform admin who sets the caps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

from .conftest import (
    assert_hub_layout,
    login,
    screenshot,
    start_platform,
    stop_platform,
    write_config,
)
from .test_platform_login import api_token, http

QUOTAS = "/services/accounting/"
A100 = 'tr[data-entry="labfleet-a100/nvidia.com/gpu"]'

#: pynvml as the hub and the batch service import it: two A100s, no MIG (nothing else)
FAKE_PYNVML = """
class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


_GPUS = [("GPU-quota-a100-0", "NVIDIA A100-PCIE-40GB"),
         ("GPU-quota-a100-1", "NVIDIA A100-PCIE-40GB")]


class _Memory:
    total = 40 * 2**30


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(_GPUS)


def nvmlDeviceGetHandleByIndex(index):
    return index


def nvmlDeviceGetUUID(handle):
    return _GPUS[handle][0]


def nvmlDeviceGetName(handle):
    return _GPUS[handle][1]


def nvmlDeviceGetMemoryInfo(handle):
    return _Memory()


def nvmlDeviceGetMigMode(handle):
    raise NVMLError_NotSupported("no MIG")
"""


@pytest.fixture(scope="module")
def gpu_platform(tmp_path_factory):
    config_dir = tmp_path_factory.mktemp("quota-platform")
    values = write_config(config_dir)
    fake = config_dir / "fake-nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    accounts = config_dir / "accounts.yaml"
    text = accounts.read_text()
    # alice administers ml; bob is a member of ml who does not
    text = text.replace(
        "groups: [ai-infn/users, ai-infn/ml]\n",
        "groups: [ai-infn/users, ai-infn/ml, ai-infn/ml-admins]\n",
        1,
    ).replace("groups: [ai-infn/users, ai-infn/cms]\n", "groups: [ai-infn/users, ai-infn/ml]\n", 1)
    accounts.write_text(text)
    old = os.environ.get("PYTHONPATH")
    # the hub hands PYTHONPATH on to its services (JupyterHub's env_keep)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake), old) if p)
    try:
        running = start_platform(config_dir)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    yield running, fake
    stop_platform(running.process)
    shutil.rmtree(values["spawner"]["storage_root"], ignore_errors=True)


def signed_in(browser, platform, name):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    login(page, platform, name, f"{name}-pass")
    page.wait_for_url(re.compile(r"/hub/"))
    return context, page


def submit(platform, token, name) -> str:
    body = {"name": name, "profile": "gpu-a100", "group": "ml", "script": "sleep 600"}
    status, text = http(
        "POST", f"{platform.url}/services/batch/api/jobs", token, json.dumps(body).encode()
    )
    assert status == 201, text
    return json.loads(text)["id"]


def job(platform, token, job_id) -> dict:
    status, text = http("GET", f"{platform.url}/services/batch/api/jobs/{job_id}", token)
    assert status == 200, text
    return json.loads(text)


def wait_job(platform, token, job_id, state, timeout=60) -> tuple[dict, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        found = job(platform, token, job_id)
        if found["state"] == state:
            return found, time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"{job_id} not {state} after {timeout}s: {found}")


def set_a100_on_page(page, platform, value: str) -> None:
    page.goto(f"{platform.url}{QUOTAS}quotas?group=ml")
    page.wait_for_selector("#quotas")
    page.fill(f"{A100} input", value)
    page.click("#quota-page button[type=submit]")
    page.wait_for_selector("#message")
    assert page.inner_text("#message") == "Saved 1 change(s)."
    assert page.input_value(f"{A100} input") == value


def test_group_admin_changes_the_a100_limit_on_the_page_and_jobs_follow(gpu_platform, browser):
    platform, _ = gpu_platform
    url = f"{platform.url}{QUOTAS}"
    # carol, a platform admin, caps ml's A100s at 2 (the YAML gives it 1)
    carol_context, carol = signed_in(browser, platform, "carol")
    carol_token = api_token(carol, platform)
    caps = {"caps": [{"flavor": "labfleet-a100", "resource": "nvidia.com/gpu",
                      "max_nominal": "2"}]}  # fmt: skip
    status, text = http("PUT", url + "api/quota-caps/ml", carol_token, json.dumps(caps).encode())
    assert status == 200, text
    carol_context.close()

    alice_context, alice = signed_in(browser, platform, "alice")
    alice_token = api_token(alice, platform)
    # her usage page links the quota page of the group she administers
    alice.goto(url)
    alice.locator("#quota-links a", has_text="ml").click()
    alice.wait_for_selector("#quotas")
    assert alice.input_value(f"{A100} input") == "1"  # the YAML's
    first = submit(platform, alice_token, "first")
    wait_job(platform, alice_token, first, "running")

    # she lowers the limit under what runs: the running job is not stopped
    set_a100_on_page(alice, platform, "0")
    assert_hub_layout(alice, "alice")
    assert "they are not stopped" in alice.inner_text("#over-limit")
    assert alice.inner_text(f"{A100} td.in-use").startswith("1")
    second = submit(platform, alice_token, "second")
    time.sleep(1.5)  # a scheduling pass has long run
    waiting = job(platform, alice_token, second)
    assert waiting["state"] == "queued", waiting
    assert "lowered while they ran" in waiting["queue"]["message"], waiting
    assert job(platform, alice_token, first)["state"] == "running"
    screenshot(alice, "quota-local-lowered")

    # above the cap: 400 naming the field, nothing changed
    over = {"quotas": [{"flavor": "labfleet-a100", "resource": "nvidia.com/gpu",
                        "nominalQuota": "3"}]}  # fmt: skip
    status, text = http("PUT", url + "api/quotas/ml", alice_token, json.dumps(over).encode())
    assert status == 400 and "quotas[0].nominalQuota: 3" in json.loads(text)["message"], text
    unknown = {"quotas": [{"flavor": "labfleet-h100", "resource": "nvidia.com/gpu",
                           "nominalQuota": "1"}]}  # fmt: skip
    status, text = http("PUT", url + "api/quotas/ml", carol_token, json.dumps(unknown).encode())
    assert status == 400 and "quotas[0].flavor" in json.loads(text)["message"], text

    # bob, a member of ml but not its admin: 403 on the API, the page read only
    bob_context, bob = signed_in(browser, platform, "bob")
    bob_token = api_token(bob, platform)
    raise_ = {"quotas": [{"flavor": "labfleet-a100", "resource": "nvidia.com/gpu",
                          "nominalQuota": "2"}]}  # fmt: skip
    status, text = http("PUT", url + "api/quotas/ml", bob_token, json.dumps(raise_).encode())
    assert status == 403 and "admins of group 'ml'" in json.loads(text)["message"], text
    bob.goto(f"{url}quotas?group=ml")
    bob.wait_for_selector("#quotas")
    assert "Read only" in bob.inner_text("#rights")
    assert bob.locator(f"{A100} input").is_disabled()
    assert bob.locator("#quota-page button[type=submit]").count() == 0
    assert bob.input_value(f"{A100} input") == "0"
    screenshot(bob, "quota-local-read-only")
    # the form's POST (with the page's own XSRF token) is refused too
    status, text = bob.evaluate(
        """async () => {
            const xsrf = document.querySelector('input[name=_xsrf]').value;
            const r = await fetch(location.href, {method: 'POST',
                headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                body: '_xsrf=' + encodeURIComponent(xsrf) + '&nominal-3=2'});
            return [r.status, await r.text()];
        }"""
    )
    assert "only admins of group" in text, text
    assert status == 403
    bob_context.close()
    assert job(platform, alice_token, second)["state"] == "queued"

    # she raises it: the waiting job starts at once, the first still runs
    saved = time.monotonic()
    set_a100_on_page(alice, platform, "2")
    _, waited = wait_job(platform, alice_token, second, "running", timeout=15)
    started_after = time.monotonic() - saved
    assert job(platform, alice_token, first)["state"] == "running"
    print(f"waiting job running {started_after:.2f} s after the Save click ({waited:.2f} s poll)")
    assert "over-limit" not in alice.content()

    # the audit log lists both changes: who, before, after (page and API)
    rows = alice.locator("#audit tbody tr").all_inner_texts()
    changes = [r for r in rows if "quota.set" in r]
    assert len(changes) == 2, rows
    assert "alice" in changes[0] and "labfleet-a100/nvidia.com/gpu: 0 → 2" in changes[0]
    assert "alice" in changes[1] and "labfleet-a100/nvidia.com/gpu: 1 → 0" in changes[1]
    assert any("quota_cap.set" in r and "carol" in r for r in rows)
    status, text = http("GET", url + "api/audit?group=ml", alice_token)
    entries = [e for e in json.loads(text)["entries"] if e["action"] == "quota.set"]
    assert [e["actor"] for e in entries] == ["alice", "alice"] and entries[0]["mode"] == "local"
    screenshot(alice, "quota-local-raised")
    for job_id in (first, second):
        http("DELETE", f"{platform.url}/services/batch/api/jobs/{job_id}", alice_token)
    alice_context.close()


def test_live_limits_survive_a_restart_and_check_config_reports_them(gpu_platform, browser):
    platform, fake = gpu_platform
    live = platform.state_dir / "batch" / "group-limits.json"
    assert json.loads(live.read_text())["groups"]["ml"]["accelerators"]["a100"] == 2
    assert stat.S_IMODE(live.stat().st_mode) == 0o600
    config = platform.config_dir / "labfleet.yaml"
    check = subprocess.run(
        [sys.executable, "-m", "labfleet_hub.cli", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "batch.queues.groups.ml.accelerators.a100: 1 in the YAML, 2 live" in check.stdout

    stop_platform(platform.process)
    os.environ["PYTHONPATH"] = str(fake)
    try:
        restarted = start_platform(platform.config_dir)
    finally:
        os.environ.pop("PYTHONPATH")
    platform.process = restarted.process  # the module's fixture stops this one
    context, page = signed_in(browser, restarted, "alice")
    page.goto(f"{restarted.url}{QUOTAS}quotas?group=ml")
    page.wait_for_selector("#quotas")
    assert page.input_value(f"{A100} input") == "2"
    context.close()
