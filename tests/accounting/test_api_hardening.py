"""Issue 10, API hardening of the accounting service: a body over its limit (it used to
accept 100 MB) is read to its end and answered with a JSON 413 naming the limit, on
the service's real tornado server (the size ``labfleet-accounting serve`` listens with)
and through the real configurable-http-proxy. Bodies within the limit, JSON and the
quota page's form, still reach their handlers."""

from __future__ import annotations

import json

import httpx
from jupyterhub.services.auth import HubOAuth
from labfleet_accounting import db
from labfleet_accounting.budgets import BudgetChecker
from labfleet_accounting.openapi import DOCUMENT
from labfleet_accounting.reports import Weights
from labfleet_accounting.service import Context, make_app
from labfleet_hub.bodylimit import HARD_CAP_BYTES, MAX_BODY_BYTES
from prometheus_client import CollectorRegistry

from tests.accounting import test_service_authz as authz
from tests.conftest import free_port
from tests.proxy import assert_json_413, real_proxy

fake_hub = authz.fake_hub


async def test_oversize_bodies_get_a_json_413_directly_and_through_the_proxy(fake_hub, tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    db.upgrade(engine)
    hub_auth = HubOAuth(api_url=fake_hub, api_token="service-token", access_scopes={authz.SCOPE},
                        cache_max_age=0, base_url="/services/accounting/",
                        hub_prefix="/hub/", login_url="/hub/login")  # fmt: skip
    context = Context(engine, Weights(), "{group}-admins", {}, BudgetChecker(engine),
                      CollectorRegistry())  # fmt: skip
    port = free_port()
    server = make_app(context, hub_auth, "/services/accounting/").listen(
        port, "127.0.0.1", max_body_size=HARD_CAP_BYTES
    )
    origin = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "token root-token", "Content-Type": "application/json"}
    try:
        with real_proxy(origin) as proxied:
            async with httpx.AsyncClient(timeout=60) as client:
                for base, group in ((origin, "ml"), (proxied, "cms")):
                    url = base + f"/services/accounting/api/budgets/{group}"
                    for size in (MAX_BODY_BYTES + 1, 10 * 1024 * 1024):
                        payload = json.dumps({"gpu_hours": 1, "pad": "x" * size}).encode()
                        assert_json_413(await client.put(url, content=payload, headers=headers))
                        # nothing was set
                        assert BudgetChecker(engine).budget(group) is None
                    # within the limit: handled as before
                    body = json.dumps({"gpu_hours": 5, "pad": "x" * (MAX_BODY_BYTES - 100)})
                    r = await client.put(url, content=body, headers=headers)
                    assert r.status_code == 200, r.text
                    assert r.json() == {"group": group, "gpu_hours": 5.0, "period": "month"}
                    # the connection stays usable
                    r = await client.get(base + "/services/accounting/api/usage", headers=headers)
                    assert r.status_code == 200
                # the OpenAPI document, without a token
                r = await client.get(origin + "/services/accounting/api/openapi.json")
                assert r.status_code == 200
                assert r.json()["servers"] == [{"url": "/services/accounting"}]
                assert r.json()["paths"] == json.loads(json.dumps(DOCUMENT["paths"]))
    finally:
        server.stop()
        engine.dispose()


async def test_form_bodies_within_the_limit_are_parsed_as_before():
    """The quota page's form (``get_body_argument``) on a handler with BodyLimit."""
    from labfleet_hub.bodylimit import BodyLimit
    from tornado import web

    class Form(BodyLimit, web.RequestHandler):
        max_body_bytes = 1000

        def post(self):
            self.finish({"a": self.get_body_argument("a"), "size": len(self.request.body)})

    port = free_port()
    server = web.Application([("/form", Form)]).listen(port, "127.0.0.1")
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"http://127.0.0.1:{port}/form"
            r = await client.post(url, data={"a": "x" * 10})
            assert r.status_code == 200 and r.json() == {"a": "x" * 10, "size": 12}
            r = await client.post(url, data={"a": "x" * 2000})
            assert r.status_code == 413 and "1000 bytes" in r.json()["message"]
    finally:
        server.stop()
