"""The GPU exporter's /metrics wants the bearer token (issue 10), on the real process.

``labfleet-accounting gpu-exporter`` runs as a process on loopback (no NVIDIA
driver needed: it serves its own error counter and no device), with the token
file ``labfleet up`` would generate; it answers through the accounting
service's own handler (labfleet_accounting.metrics_http).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import free_port

TOKEN = "exporter-token-" + "ab" * 24


def get(url: str, authorization: str | None = None):
    """(status, headers (case-insensitive), body)."""
    request = urllib.request.Request(url)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def exporter(tmp_path, *args: str):
    port = free_port()
    log = open(tmp_path / f"exporter-{port}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "labfleet_accounting.app", "gpu-exporter",
         f"--GpuExporterApp.exporter_port={port}", *args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            get(url)
            return process, url
        except OSError:
            assert process.poll() is None, (tmp_path / f"exporter-{port}.log").read_text()
            time.sleep(0.2)
    pytest.fail("the exporter did not listen")


def stop(process):
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=15) is not None


def test_401_without_403_wrong_200_with_the_token(tmp_path):
    token_file = tmp_path / "gpu-exporter-metrics-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    process, url = exporter(tmp_path, f"--GpuExporterApp.metrics_token_file={token_file}")
    try:
        status, headers, body = get(url)
        assert status == 401 and "labfleet_" not in body
        assert headers["WWW-Authenticate"] == 'Bearer realm="labfleet GPU exporter"'
        for wrong in ("Bearer wrong", f"Bearer {TOKEN}x", "Bearer", f"token {TOKEN}"):
            status, _, body = get(url, wrong)
            assert status in (401, 403) and "labfleet_" not in body, wrong
        assert get(url, "Bearer not-the-token")[0] == 403
        status, headers, body = get(url, f"Bearer {TOKEN}")
        assert status == 200, body
        assert headers["Content-Type"].startswith("text/plain; version=")
        assert "labfleet_gpu_exporter_errors_total" in body
        # the token is not on the exporter's command line, only its file
        assert TOKEN not in open(f"/proc/{process.pid}/cmdline").read()
    finally:
        stop(process)


def test_without_a_token_nobody_unless_opened_deliberately(tmp_path):
    process, url = exporter(tmp_path)
    try:
        for authorization in (None, "Bearer", "Bearer x"):
            status, _, body = get(url, authorization)
            assert status == 403 and "metrics are closed" in body, body
            assert "GpuExporterApp.metrics_token_file" in body
    finally:
        stop(process)
    process, url = exporter(tmp_path, "--GpuExporterApp.metrics_public=True")
    try:
        status, _, body = get(url)
        assert status == 200 and "labfleet_gpu_exporter_errors_total" in body
    finally:
        stop(process)
