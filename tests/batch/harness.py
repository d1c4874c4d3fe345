"""The batch service run for real on loopback, and helpers shared by both backends' tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from labfleet_batch.service import Context, make_app
from labfleet_hub.bodylimit import HARD_CAP_BYTES
from tornado import httpserver
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from tests.batch.hub import Hub, hub_auth

PREFIX = "/services/batch/"


@dataclass
class Response:
    status: int
    body: Any
    text: str


@dataclass
class Service:
    url: str  # ends with PREFIX
    ctx: Context

    async def call(
        self, method: str, path: str, token: str | None, body: Any = None, timeout: float = 60
    ) -> Response:
        headers = {"Authorization": f"token {token}"} if token else {}
        kwargs: dict[str, Any] = {"method": method, "headers": headers, "request_timeout": timeout}
        if body is not None or method == "POST":
            kwargs["body"] = json.dumps(body)
        try:
            resp = await AsyncHTTPClient().fetch(self.url + path, **kwargs)
        except HTTPClientError as e:
            resp = e.response
            if resp is None:
                raise
        text = resp.body.decode(errors="replace") if resp.body else ""
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        return Response(resp.code, parsed, text)

    async def wait_state(self, job_id: str, token: str, states, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            r = await self.call("GET", f"api/jobs/{job_id}", token)
            last = r.body
            if r.status == 200 and r.body["state"] in states:
                return r.body
            await asyncio.sleep(0.3)
        raise AssertionError(f"{job_id} not in {states} after {timeout}s; last: {last}")


@contextlib.asynccontextmanager
async def running_service(ctx: Context) -> AsyncIterator[Service]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    server = httpserver.HTTPServer(make_app(ctx, PREFIX), max_body_size=HARD_CAP_BYTES)
    server.add_sockets([sock])
    try:
        yield Service(f"http://127.0.0.1:{port}{PREFIX}", ctx)
    finally:
        server.stop()
        await server.close_all_connections()


def make_context(backend, catalogue, qconfig, hub: Hub, **kw) -> Context:
    return Context(backend, catalogue, qconfig, hub_auth(hub), **kw)


async def cross_tenant_matrix(
    service: Service, users: dict[str, tuple[str, set[str]]], jobs: dict[str, str]
) -> tuple[int, int, list[str]]:
    """Every user probes every job of every user with no group in common, on every endpoint.

    ``users``: name -> (token, groups); ``jobs``: owner name -> job id. Returns
    ``(probes, refusals, failures)``; a refusal is 404 on job endpoints, 400 on
    submit for a foreign group and 403 on listing a foreign group.
    """
    probes = refusals = 0
    failures: list[str] = []
    for prober, (token, groups) in users.items():
        for owner, (_, owner_groups) in users.items():
            if owner == prober or groups & owner_groups:
                continue
            job_id = jobs[owner]
            foreign = sorted(owner_groups)[0]
            attempts = [
                ("GET", f"api/jobs/{job_id}", None, {404}),
                ("GET", f"api/jobs/{job_id}/logs?index=0", None, {404}),
                ("DELETE", f"api/jobs/{job_id}", None, {404}),
                ("GET", f"api/jobs?group={foreign}", None, {403}),
                ("POST", "api/jobs", {"command": ["true"], "group": foreign}, {400}),
            ]
            for method, path, body, refused in attempts:
                probes += 1
                r = await service.call(method, path, token, body)
                if r.status in refused:
                    refusals += 1
                else:
                    failures.append(f"{prober} {method} {path} -> {r.status} {r.text[:200]}")
            # and the own listing of the prober never shows the owner's job
            probes += 1
            r = await service.call("GET", "api/jobs", token)
            if r.status == 200 and all(j["id"] != job_id for j in r.body["jobs"]):
                refusals += 1
            else:
                failures.append(f"{prober} sees {job_id} in own list")
    return probes, refusals, failures


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # the state follows the command name, which may itself contain ") "
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def host_pids(fragment: str) -> list[int]:
    """Pids (as this machine numbers them) whose command line contains ``fragment``.

    A job's processes live in a PID namespace of their own: the pids they see
    of themselves ($$, $!) mean nothing outside it.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline and int(entry) != os.getpid():
            found.append(int(entry))
    return found


def wait_processes_gone(pids, timeout: float = 15.0) -> list[int]:
    """Wait until every pid has exited; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if not process_gone(p)]
        if alive:
            time.sleep(0.05)
    return alive
