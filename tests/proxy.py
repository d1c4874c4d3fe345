"""The real configurable-http-proxy in front of a service under test, and the JSON 413
every labfleet service answers for a body over its limit (labfleet_hub.bodylimit)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time

import httpx
import pytest
from labfleet_hub.bodylimit import MAX_BODY_BYTES
from labfleet_hub.node_pieces import proxy_path

from tests.conftest import free_port


@contextlib.contextmanager
def real_proxy(target: str):
    """configurable-http-proxy (the one ``labfleet up`` runs) in front of ``target``."""
    chp = proxy_path()
    if not chp.exists():
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"configurable-http-proxy is not installed at {chp}", pytrace=False)
        pytest.skip(f"configurable-http-proxy is not installed at {chp} (labfleet setup)")
    port, api_port = free_port(), free_port()
    env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": os.urandom(16).hex()}
    proc = subprocess.Popen(
        [str(chp), "--ip", "127.0.0.1", "--port", str(port), "--api-ip", "127.0.0.1",
         "--api-port", str(api_port), "--default-target", target],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError("configurable-http-proxy did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def assert_json_413(r: httpx.Response):
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["status"] == 413
    assert str(MAX_BODY_BYTES) in body["message"] and "limit" in body["message"]
