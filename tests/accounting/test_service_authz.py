"""Authorization matrix of every report and budget endpoint, through a real HubOAuth.

The service runs in-process; the hub's API (``GET /hub/api/user`` with the
caller's token) is a small fake on 127.0.0.1 answering user models like
JupyterHub does, so the service's real ``HubOAuth`` code path authenticates
every request.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

import httpx
import pytest
from jupyterhub.services.auth import HubOAuth
from labfleet_accounting import db
from labfleet_accounting.budgets import BudgetChecker
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.metrics import LedgerMetrics
from labfleet_accounting.records import Usage
from labfleet_accounting.reports import Weights, parse_period
from labfleet_accounting.service import Context, make_app
from prometheus_client import CollectorRegistry
from tornado import httpserver, web

from tests.conftest import free_port

SCOPE = "access:services!service=accounting"
MARCH = parse_period("2025-03")
USERS = {
    "root-token": {"name": "root", "admin": True, "groups": []},
    "alice-token": {"name": "alice", "admin": False, "groups": ["ml", "ml-admins"]},
    "eve-token": {"name": "eve", "admin": False, "groups": ["ml"]},
    "bob-token": {"name": "bob", "admin": False, "groups": ["cms"]},
    "mallory-token": {"name": "mallory", "admin": False, "groups": ["ml"], "no_scope": True},
}


class FakeHubUser(web.RequestHandler):
    def get(self):
        token = self.request.headers.get("Authorization", "").split(" ")[-1]
        model = USERS.get(token)
        if model is None:
            raise web.HTTPError(403)
        scopes = [] if model.get("no_scope") else [SCOPE]
        self.finish({"kind": "user", "scopes": scopes, "session_id": "",
                     **{k: v for k, v in model.items() if k != "no_scope"}})  # fmt: skip


@pytest.fixture(scope="module")
def fake_hub():
    port = free_port()
    ready = threading.Event()
    holder = {}

    def serve():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server = httpserver.HTTPServer(web.Application([(r"/hub/api/user", FakeHubUser)]))
        server.listen(port, "127.0.0.1")
        holder["loop"], holder["server"] = loop, server
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{port}/hub/api"
    holder["loop"].call_soon_threadsafe(holder["loop"].stop)
    thread.join(10)


@pytest.fixture
async def service(fake_hub, tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    db.upgrade(engine)
    ledger = Ledger(engine)
    for uid, user, group in (("1", "eve", "ml"), ("2", "alice", "ml"), ("3", "bob", "cms")):
        ledger.stop(Usage("k8s", uid, MARCH[0], user, group, "batch", cpu=1.0), MARCH[0] + 3600)
    hub_auth = HubOAuth(api_url=fake_hub, api_token="service-token", access_scopes={SCOPE},
                        cache_max_age=0, base_url="/services/accounting/",
                        hub_prefix="/hub/", login_url="/hub/login")  # fmt: skip
    context = Context(engine, Weights(), "{group}-admins", {}, BudgetChecker(engine),
                      CollectorRegistry(), clock=lambda: MARCH[0] + 86400)  # fmt: skip
    app = make_app(context, hub_auth, "/services/accounting/")
    port = free_port()
    server = app.listen(port, "127.0.0.1")
    yield f"http://127.0.0.1:{port}/services/accounting/"
    server.stop()
    engine.dispose()


# (method, path) -> who gets 200; everyone else with a token gets 403.
MATRIX = {
    ("GET", "api/usage?period=2025-03"): {"root", "alice", "eve", "bob"},
    ("GET", "api/usage?period=2025-03&format=csv"): {"root", "alice", "eve", "bob"},
    ("GET", "api/usage?period=2025-03&group=ml&by=group"): {"root", "alice"},
    ("GET", "api/usage?period=2025-03&user=eve"): {"root", "eve"},
    ("GET", "api/usage?period=2025-03&user=eve&group=ml"): {"root", "alice", "eve"},
    ("GET", "api/usage?period=2025-03&group=cms"): {"root"},
    ("GET", "api/usage/series?period=2025-03"): {"root", "alice", "eve", "bob"},
    ("GET", "api/usage/series?period=2025-03&group=ml"): {"root", "alice"},
    ("GET", "api/usage/series?period=2025-03&user=bob"): {"root", "bob"},
    ("GET", "api/usage/recent?period=2025-03"): {"root", "alice", "eve", "bob"},
    ("GET", "api/usage/recent?period=2025-03&group=ml"): {"root", "alice"},
    ("GET", "api/usage/recent?period=2025-03&user=eve"): {"root", "eve"},
    ("GET", "?period=2025-03"): {"root", "alice", "eve", "bob"},
    ("GET", "?period=2025-03&group=ml"): {"root", "alice"},
    ("GET", "api/budget/check?group=ml&accelerator_kind=gpu"): {"root", "alice", "eve"},
    ("PUT", "api/budgets/ml"): {"root"},
}


async def test_authorization_matrix(service):
    probes = refusals = 0
    async with httpx.AsyncClient(follow_redirects=False, timeout=30) as client:
        for (method, path), allowed in MATRIX.items():
            body = json.dumps({"gpu_hours": 10}) if method == "PUT" else None
            for token, model in USERS.items():
                name = model["name"]
                r = await client.request(method, service + path, content=body,
                                         headers={"Authorization": f"token {token}"})  # fmt: skip
                probes += 1
                expected = 200 if name in allowed else 403
                assert r.status_code == expected, f"{name} {method} {path}: {r.text[:300]}"
                if expected == 403:
                    refusals += 1
                    if name != "mallory":  # mallory lacks the access scope: refused by HubAuth
                        assert (
                            "may" in r.json()["message"]
                            or "only" in r.json()["message"]
                            or ("not a member" in r.json()["message"])
                        )
            r = await client.request(method, service + path, content=body)  # no token
            probes += 1
            refusals += 1
            assert r.status_code in (302, 403), f"anonymous {method} {path}"
            assert "usage" not in r.text
    assert (probes, refusals) == (96, 96 - sum(len(a) for a in MATRIX.values()))


async def test_users_see_only_what_they_may(service):
    async with httpx.AsyncClient(timeout=30) as client:

        async def get(token, path):
            r = await client.get(service + path, headers={"Authorization": f"token {token}"})
            assert r.status_code == 200, r.text
            return r

        eve = (await get("eve-token", "api/usage?period=2025-03")).json()["usage"]
        assert set(eve) == {"eve"} and eve["eve"]["batch"]["cpu_core_hours"] == 1.0
        ml = (await get("alice-token", "api/usage?period=2025-03&group=ml")).json()["usage"]
        assert set(ml) == {"alice", "eve"}
        everyone = (await get("root-token", "api/usage?period=2025-03&by=group")).json()["usage"]
        assert set(everyone) == {"ml", "cms"}
        csv = (await get("root-token", "api/usage?period=2025-03&by=group&format=csv")).text
        assert (
            csv.splitlines()[0] == "group,kind,resource,model,hours" and "cms,batch,cpu_core" in csv
        )
        page = (await get("alice-token", "?period=2025-03&group=ml")).text
        assert "<svg" in page and ">eve<" not in page.split('id="recent"')[0]  # by group
        # ... and the group's sessions and jobs below, eve's among them, bob's not
        recent = page.split('id="recent"', 1)[1]
        assert '<td class="user">eve</td>' in recent and ">bob<" not in recent
        for token, path, users in (
            ("eve-token", "api/usage/recent?period=2025-03", {"eve"}),
            ("bob-token", "api/usage/recent?period=2025-03", {"bob"}),
            ("alice-token", "api/usage/recent?period=2025-03&group=ml", {"alice", "eve"}),
            ("root-token", "api/usage/recent?period=2025-03", {"alice", "eve", "bob"}),
        ):
            body = (await get(token, path)).json()
            assert body["limit"] == 50 and {e["user"] for e in body["recent"]} == users, path
        (one,) = (await get("eve-token", "api/usage/recent?period=2025-03")).json()["recent"]
        assert (one["kind"], one["source"], one["uid"], one["cpu_core_hours"]) == (
            "batch", "k8s", "1", 1.0,
        )  # fmt: skip
        # the hub's layout: its scripts (Bootstrap, dark mode), none from elsewhere
        sources = re.findall(r'<script src="([^"]+)"', page)
        assert sources and all(src.startswith("/hub/static/") for src in sources)
        bad = await client.get(service + "api/usage?period=March",
                               headers={"Authorization": "token eve-token"})  # fmt: skip
        assert bad.status_code == 400 and "YYYY-MM" in bad.json()["message"]
        await client.put(service + "api/budgets/ml", content=json.dumps({"gpu_hours": 0}),
                         headers={"Authorization": "token root-token"})  # fmt: skip
        check = (await get("eve-token", "api/budget/check?group=ml&accelerator_kind=gpu")).json()
        assert check["verdict"] == "refuse" and not check["allowed"]
        assert "GPU-hours" in check["message"]


async def test_budgets_refuse_values_that_are_not_numbers_of_hours(service):
    """NaN and infinity parse as floats; a budget of either would disable enforcement."""
    async with httpx.AsyncClient(timeout=30) as client:
        for body in (
            '{"gpu_hours": NaN}',
            '{"gpu_hours": Infinity}',
            '{"gpu_hours": 10, "warn_fraction": NaN}',
            '{"gpu_hours": 10, "warn_fraction": 2}',
            '{"gpu_hours": 10, "enforce": "no"}',
        ):
            r = await client.put(service + "api/budgets/cms", content=body,
                                 headers={"Authorization": "token root-token"})  # fmt: skip
            assert r.status_code == 400, (body, r.text)
            assert "gpu_hours" in r.json()["message"]


async def metrics_app(fake_hub, tmp_path, **kw):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.upgrade(engine)
    Ledger(engine).stop(Usage("k8s", "1", MARCH[0], "eve", "ml", "batch", cpu=1.0), MARCH[0] + 60)
    registry = CollectorRegistry()
    registry.register(LedgerMetrics(engine, Weights()))
    hub_auth = HubOAuth(api_url=fake_hub, api_token="service-token", access_scopes={SCOPE},
                        cache_max_age=0, base_url="/services/accounting/",
                        hub_prefix="/hub/", login_url="/hub/login")  # fmt: skip
    context = Context(engine, Weights(), "{group}-admins", {}, BudgetChecker(engine), registry)
    app = make_app(context, hub_auth, "/services/accounting/", **kw)
    port = free_port()
    return app.listen(port, "127.0.0.1"), f"http://127.0.0.1:{port}/services/accounting/metrics"


async def test_metrics_need_the_bearer_token(fake_hub, tmp_path):
    server, url = await metrics_app(fake_hub, tmp_path, metrics_token="the-metrics-token")
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.get(url)  # issue 10: every group's usage, to anyone
            assert r.status_code == 401 and 'Bearer realm="' in r.headers["WWW-Authenticate"]
            assert "labfleet_" not in r.text
            for wrong in ("Bearer wrong", "Bearer the-metrics-tokenX", "Bearer",
                          "token the-metrics-token", "Basic dGhlLW1ldHJpY3MtdG9rZW4="):  # fmt: skip
                r = await client.get(url, headers={"Authorization": wrong})
                assert r.status_code in (401, 403), wrong
                assert "labfleet_" not in r.text
            # a hub admin's API token does not open them either
            r = await client.get(url, headers={"Authorization": "token root-token"})
            assert r.status_code == 401
            r = await client.get(url, headers={"Authorization": "Bearer the-metrics-token"})
            assert r.status_code == 200
            assert 'labfleet_cpu_core_seconds_total{group="ml",kind="batch"} 60.0' in r.text
    finally:
        server.stop()


async def test_metrics_without_a_token_are_closed_unless_opened(fake_hub, tmp_path):
    server, url = await metrics_app(fake_hub, tmp_path)  # no token: nobody
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer x"}):
                r = await client.get(url, headers=headers)
                assert r.status_code == 403 and "metrics are closed" in r.text
    finally:
        server.stop()
    server, url = await metrics_app(fake_hub, tmp_path, metrics_public=True)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.get(url)  # opened deliberately
            assert r.status_code == 200 and "labfleet_cpu_core_seconds_total" in r.text
    finally:
        server.stop()
