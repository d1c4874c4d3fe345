"""A token revoked at the hub stops working at the accounting service (issue 10).

The accounting service used to keep JupyterHub's default 300 s HubAuth cache:
a deleted token (or a stopped notebook's) went on reading every report it
could see, and changing budgets or quotas where its owner may, for five minutes.
Now it shares the batch service's rule (``labfleet_hub.hubauth``): changes ask
the hub every time, reads keep the answer ``AUTH_CACHE_SECONDS``.

The service's own HubOAuth, built by ``AccountingApp.make_hub_auth`` from the
environment the hub gives a service, runs against a real JupyterHub (the
batch tests' hub, whose registered service ``batch`` lends its token and
access scope: what is tested is the cache, not the service's name).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from labfleet_accounting import db
from labfleet_accounting.app import AccountingApp
from labfleet_accounting.budgets import BudgetChecker
from labfleet_accounting.reports import Weights
from labfleet_accounting.service import Context, make_app
from labfleet_hub.hubauth import AUTH_CACHE_SECONDS, FreshHubOAuth
from prometheus_client import CollectorRegistry

from tests.batch.conftest import hub  # noqa: F401  (session fixture: a real JupyterHub)
from tests.batch.hub import BATCH_SCOPE
from tests.batch.test_batch_local_api import unique
from tests.conftest import free_port

PREFIX = "/services/accounting/"


def service_hub_auth(the_hub, monkeypatch) -> FreshHubOAuth:
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", the_hub.batch_token)
    monkeypatch.setenv("JUPYTERHUB_API_URL", the_hub.url)
    monkeypatch.setenv("JUPYTERHUB_SERVICE_NAME", "batch")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", PREFIX)
    monkeypatch.setenv("JUPYTERHUB_OAUTH_ACCESS_SCOPES", json.dumps([BATCH_SCOPE]))
    app = AccountingApp()
    app.initialize([])
    hub_auth = app.make_hub_auth()
    assert isinstance(hub_auth, FreshHubOAuth)
    assert hub_auth.cache_max_age == AUTH_CACHE_SECONDS <= 10  # not JupyterHub's 300
    return hub_auth


async def test_a_revoked_token_is_refused_at_once_for_changes_and_soon_for_reads(
    hub,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    db.upgrade(engine)
    context = Context(engine, Weights(), "{group}-admins", {}, BudgetChecker(engine),
                      CollectorRegistry())  # fmt: skip
    app = make_app(context, service_hub_auth(hub, monkeypatch), PREFIX)
    port = free_port()
    server = app.listen(port, "127.0.0.1")
    base = f"http://127.0.0.1:{port}{PREFIX}"

    user = unique("acctuser")
    hub.add_user(user, ["ml"])
    made = hub.api("POST", f"/users/{user}/tokens", {"scopes": [BATCH_SCOPE], "note": "revoke"})
    token, token_id = made["token"], made["id"]
    headers = {"Authorization": f"token {token}"}
    budget = json.dumps({"gpu_hours": 10})
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=30) as client:

            async def read():
                return (await client.get(base + "api/usage", headers=headers)).status_code

            async def change() -> str:
                # a change the handler itself refuses to a user who is not a platform
                # admin: its message shows that the token was accepted
                r = await client.put(base + "api/budgets/ml", content=budget, headers=headers)
                assert r.status_code in (302, 401, 403), r.text
                return r.text

            assert await read() == 200
            assert "only platform admins set budgets" in await change()  # token accepted
            assert await read() == 200  # the answer is in the cache now

            hub.api("DELETE", f"/users/{user}/tokens/{token_id}")
            revoked_at = time.monotonic()
            # a change: the token refused at once, though its answer is in the cache
            assert "only platform admins" not in await change()
            # reads: refused once the short cache expires (generous bound for a loaded machine)
            while (status := await read()) == 200:
                assert time.monotonic() - revoked_at < AUTH_CACHE_SECONDS + 20, "still reading"
                await asyncio.sleep(0.5)
            assert status in (302, 401, 403)
            waited = time.monotonic() - revoked_at
            print(f"reads refused {waited:.1f} s after the revocation")
            # another user's valid token is not affected
            other = hub.add_user(unique("acctvalid"), ["ml"])
            r = await client.get(base + "api/usage", headers={"Authorization": f"token {other}"})
            assert r.status_code == 200
    finally:
        server.stop()
        engine.dispose()
