"""Login-to-JupyterLab latency: labfleet against stock JupyterHub, same run.

Both hubs share one development identity provider (two registered clients),
the same local spawner, catalogue and headless Chromium. Each round logs a
fresh browser context in, picks the CPU profile, waits until JupyterLab's
splash is gone, and stops the server; the order of the two hubs alternates.

    .venv/bin/python -m benchmarks.login_latency --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from labfleet_hub import devidp
from labfleet_hub.cli import stop_stray_proxy
from labfleet_hub.node_pieces import ensure_proxy

from tests.conftest import free_port
from tests.integration.conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    Platform,
    login,
    start_platform,
    stop_platform,
    write_config,
)


def wait_healthy(url, timeout=60):
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/hub/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not become healthy")


def one_login(browser, platform: Platform, user: str, password: str) -> float:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(120_000)
    start = time.perf_counter()
    login(page, platform, user, password)
    page.wait_for_url(re.compile(r"/hub/spawn"))
    page.check("#profile-cpu")
    page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
    page.wait_for_url(re.compile(r"/user/[^/]+/lab"))
    page.wait_for_selector("#jupyterlab-splash", state="detached")
    elapsed = time.perf_counter() - start
    page.goto(f"{platform.url}/hub/home")
    page.locator("#stop").click()
    deadline = time.monotonic() + 60
    while platform.running_servers(user) and time.monotonic() < deadline:
        time.sleep(0.2)
    context.close()
    return elapsed


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/login_latency.json")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="labfleet-bench-"))
    work.chmod(0o755)
    secret = secrets.token_hex(32)
    lab_dir, stock_dir = work / "labfleet", work / "stock"
    values = write_config(lab_dir, idp=False)
    stock_port = free_port()
    idp_port = free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    values["iam"]["issuer"] = issuer + "/"
    (lab_dir / "secret").write_text(secret)
    values["iam"]["client_secret_file"] = "secret"
    (lab_dir / "labfleet.yaml").write_text(yaml.safe_dump(values))
    print("==> starting the identity provider", flush=True)
    devidp.ensure_installed()
    idp = devidp.start(
        port=idp_port,
        issuer=issuer,
        accounts_path=str(lab_dir / "accounts.yaml"),
        clients=[
            {
                "client_id": "labfleet-hub",
                "client_secret": secret,
                "redirect_uris": [f"http://127.0.0.1:{values['hub']['port']}/hub/oauth_callback"],
            },
            {
                "client_id": "stock-hub",
                "client_secret": secret,
                "redirect_uris": [f"http://127.0.0.1:{stock_port}/hub/oauth_callback"],
            },
        ],
        log_path=work / "devidp.log",
    )
    print("==> starting labfleet and stock JupyterHub", flush=True)
    lab = start_platform(lab_dir)
    stock_dir.mkdir()
    (stock_dir / "storage").mkdir(mode=0o755)
    proxy = ensure_proxy()
    env = {
        **os.environ,
        "PATH": f"{Path(proxy).parent}{os.pathsep}{os.environ['PATH']}",
        "BENCH_PORT": str(stock_port),
        "BENCH_HUB_PORT": str(free_port()),
        "BENCH_PROXY_PORT": str(free_port()),
        "BENCH_STATE": str(stock_dir),
        "BENCH_ISSUER": issuer,
        "BENCH_CLIENT_ID": "stock-hub",
        "BENCH_CLIENT_SECRET": secret,
        "BENCH_CRYPT_KEY": secrets.token_hex(32),
        "BENCH_CATALOGUE": str(lab_dir / "catalogue.yaml"),
        "BENCH_STORAGE": str(stock_dir / "storage"),
        "BENCH_SINGLEUSER": str(Path(sys.executable).parent / "jupyterhub-singleuser"),
    }
    stock_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterhub",
            "-f",
            str(ROOT / "benchmarks" / "stock_jupyterhub_config.py"),
        ],
        cwd=stock_dir,
        env=env,
        stdout=open(stock_dir / "hub.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stock = Platform(
        url=f"http://127.0.0.1:{stock_port}",
        config_dir=stock_dir,
        state_dir=stock_dir,
        accounts=lab_dir / "accounts.yaml",
        process=stock_proc,
        log=stock_dir / "hub.log",
    )
    times = {"labfleet": [], "stock": []}
    try:
        wait_healthy(stock.url)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            # one warm-up each: first imports and JupyterLab asset caching
            one_login(browser, lab, "alice", "alice-pass")
            one_login(browser, stock, "alice", "alice-pass")
            for round_ in range(args.rounds):
                order = [("labfleet", lab), ("stock", stock)]
                if round_ % 2:
                    order.reverse()
                for name, target in order:
                    seconds = one_login(browser, target, "alice", "alice-pass")
                    times[name].append(seconds)
                    print(f"round {round_ + 1}/{args.rounds} {name:8} {seconds:.2f} s", flush=True)
            browser.close()
    finally:
        stop_platform(stock_proc)
        stop_stray_proxy(stock_dir / "jupyterhub-proxy.pid")  # its own session: see cli
        stop_platform(lab.process)
        idp.stop()
        shutil.rmtree(values["spawner"]["storage_root"], ignore_errors=True)
    result = {
        "rounds": args.rounds,
        "seconds": times,
        "median": {k: statistics.median(v) for k, v in times.items()},
    }
    result["ratio_labfleet_over_stock"] = result["median"]["labfleet"] / result["median"]["stock"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median", "ratio_labfleet_over_stock")}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
