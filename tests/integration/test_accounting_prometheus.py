"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes the accounting service and exporter.

The accounting service runs as the real ``labfleet-accounting serve``
process on a seeded SQLite ledger, with its metrics bearer token in a file
(``metrics_token_file``, as ``labfleet up`` runs it), and Prometheus scrapes it
with the configuration ``labfleet prometheus-config`` prints
(``configurer.prometheus_config``: ``authorization.credentials_file``); a job
without the token and one with a wrong token are refused. The GPU exporter
runs as ``labfleet-accounting gpu-exporter`` (on a machine without an NVIDIA
driver it exports its error counter only) with its own token file, scraped by
the exporter job ``labfleet prometheus-config`` prints (and refused without
the token). Prometheus scrapes both every second; the test reads the values
back through Prometheus's HTTP API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from labfleet_accounting import db
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.records import Usage
from labfleet_hub.configurer import prometheus_config

from tests.conftest import free_port

from .conftest import stop_platform

PROMETHEUS = "/usr/bin/prometheus"
TOKEN = "scrape-token-for-tests"
EXPORTER_TOKEN = "exporter-scrape-token-for-tests"
PREFIX = "/services/accounting/"


def get(url: str, timeout=5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def wait_until(what, fn, timeout=60.0, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def spawn(args, log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def seed(url: str, now: int) -> None:
    engine = db.make_engine(url)
    db.upgrade(engine)
    ledger = Ledger(engine)
    # ml holds two T4s now (an hour so far); cms ran 8 cores for an hour, ended an hour ago
    ledger.start(
        Usage("k8s", "p1", now - 3600, "alice", "ml", "interactive", "gpu-t4", "t4", "gpu", 2,
              cpu=4.0, memory=16 * 2**30)
    )  # fmt: skip
    ledger.stop(Usage("k8s", "p2", now - 7200, "bob", "cms", "batch", cpu=8.0), now - 3600)
    engine.dispose()


def query(prom: str, promql: str) -> list[dict]:
    status, body = get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    if status != 200:
        return []
    return json.loads(body)["data"]["result"]


@pytest.fixture
def stack(tmp_path):
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"{PROMETHEUS} is missing: run `make test` (it installs Debian prometheus)")
    now = int(time.time())
    db_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    seed(db_url, now)
    service_port, exporter_port, prom_port = free_port(), free_port(), free_port()
    token_file = tmp_path / "secrets" / "accounting-metrics-token"
    token_file.parent.mkdir(mode=0o700)
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    exporter_token_file = tmp_path / "secrets" / "gpu-exporter-metrics-token"
    exporter_token_file.write_text(EXPORTER_TOKEN + "\n")
    exporter_token_file.chmod(0o600)
    processes = []
    service = spawn(
        [sys.executable, "-m", "labfleet_accounting.app", "serve", f"--db-url={db_url}",
         f"--port={service_port}", f"--AccountingApp.metrics_token_file={token_file}"],
        tmp_path / "service.log",
        # what the hub gives a managed service; the hub itself is not needed for /metrics
        env={"JUPYTERHUB_API_TOKEN": "unused", "JUPYTERHUB_SERVICE_PREFIX": PREFIX,
             "JUPYTERHUB_API_URL": f"http://127.0.0.1:{free_port()}/hub/api"},
    )  # fmt: skip
    processes.append(service)
    exporter = spawn(
        [sys.executable, "-m", "labfleet_accounting.app", "gpu-exporter",
         f"--GpuExporterApp.exporter_port={exporter_port}",
         f"--GpuExporterApp.metrics_token_file={exporter_token_file}"],
        tmp_path / "exporter.log",
    )  # fmt: skip
    processes.append(exporter)
    # what `labfleet prometheus-config` prints for a hub at this address (the service
    # itself here, with the service prefix the proxy would route)
    values = {"hub": {"public_url": f"http://127.0.0.1:{service_port}", "base_url": "/"},
              "accounting": {"metrics_public": False}, "spawner": {"kind": "local"}}  # fmt: skip
    job, gpu_job = prometheus_config(values, token_file, exporter_token_file)["scrape_configs"]
    assert gpu_job["authorization"] == {
        "type": "Bearer", "credentials_file": str(exporter_token_file)}  # fmt: skip
    assert job["authorization"] == {"type": "Bearer", "credentials_file": str(token_file)}
    assert job["metrics_path"] == f"{PREFIX}metrics"
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {**job, "job_name": "accounting"},
            {
                # the same endpoint without the token must be refused (up == 0)
                "job_name": "accounting-no-token",
                "metrics_path": f"{PREFIX}metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{service_port}"]}],
            },
            {
                # and with another token
                "job_name": "accounting-wrong-token",
                "metrics_path": f"{PREFIX}metrics",
                "authorization": {"credentials_file": str(wrong)},
                "static_configs": [{"targets": [f"127.0.0.1:{service_port}"]}],
            },
            # the exporter job as printed, at this test's port instead of 9835
            {
                **gpu_job,
                "job_name": "gpu",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
            },
            {
                "job_name": "gpu-no-token",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = spawn(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        tmp_path / "prometheus.log",
    )  # fmt: skip
    processes.append(prometheus)
    try:
        yield f"http://127.0.0.1:{prom_port}", now, tmp_path
    finally:
        for process in reversed(processes):
            stop_platform(process)  # the same process-group stop as the platform's
    for process in processes:
        assert process.poll() is not None
        # nothing left behind in the process groups either
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)


def test_prometheus_scrapes_accounting_and_gpu_metrics(stack):
    prom, now, tmp = stack
    wait_until("Prometheus ready", lambda: get(f"{prom}/-/ready")[0] == 200, timeout=60)

    def up():
        return {r["metric"]["job"]: r["value"][1] for r in query(prom, "up")}

    def scraped():
        jobs = up()
        # every job scraped at least once: targets are scraped independently
        done = jobs.get("accounting") == "1" and jobs.get("gpu") == "1"
        refused = {"accounting-no-token", "accounting-wrong-token", "gpu-no-token"}
        return jobs if done and refused <= set(jobs) else None

    jobs = wait_until("every target scraped, with the token successfully", scraped, timeout=60)
    assert jobs["accounting-no-token"] == "0", (tmp / "service.log").read_text()[-2000:]
    assert jobs["accounting-wrong-token"] == "0"
    targets = json.loads(get(f"{prom}/api/v1/targets")[1])["data"]["activeTargets"]
    errors = {t["labels"]["job"]: t["lastError"] for t in targets}
    assert "401" in errors["accounting-no-token"] and "403" in errors["accounting-wrong-token"]
    assert errors["accounting"] == ""
    assert jobs["gpu-no-token"] == "0" and "401" in errors["gpu-no-token"]
    assert errors["gpu"] == ""

    [devices] = wait_until(
        "allocated accelerators", lambda: query(prom, "labfleet_allocated_accelerators")
    )
    labels = devices["metric"]
    assert (labels["group"], labels["kind"], labels["accelerator"]) == ("ml", "interactive", "t4")
    assert labels["accelerator_kind"] == "gpu" and labels["job"] == "accounting"
    assert float(devices["value"][1]) == 2

    gpus = query(prom, "labfleet_allocated_gpu_equivalents")
    assert [(r["metric"]["group"], float(r["value"][1])) for r in gpus] == [("ml", 2.0)]
    running = {r["metric"]["group"]: float(r["value"][1]) for r in query(
        prom, "labfleet_running_sessions")}  # fmt: skip
    assert running == {"ml": 1.0, "cms": 0.0}
    # cms: 8 cores for exactly one hour, closed
    [cms] = query(prom, 'labfleet_cpu_core_seconds_total{group="cms"}')
    assert float(cms["value"][1]) == 8 * 3600
    # ml: 2 GPUs for (at least) the hour so far
    [gpu_s] = query(prom, 'labfleet_gpu_equivalent_seconds_total{group="ml"}')
    assert 2 * 3600 <= float(gpu_s["value"][1]) <= 2 * (int(time.time()) - now + 3600 + 60)
    # PromQL over them works: GPU-hours per group
    [hours] = query(prom, "sum by (group) (labfleet_gpu_equivalent_seconds_total) / 3600")
    assert hours["metric"] == {"group": "ml"} and float(hours["value"][1]) >= 2

    # the exporter's own counter arrives; device series exist only where NVML answers
    [errors] = wait_until(
        "exporter errors counter", lambda: query(prom, "labfleet_gpu_exporter_errors_total")
    )
    assert errors["metric"]["job"] == "gpu"
