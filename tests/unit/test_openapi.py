"""The OpenAPI documents of the batch and accounting services are true to their tornado
applications: every route is a path of the document with the methods its handler
answers, and every path of the document is a route (issue 10)."""

from __future__ import annotations

import re

import pytest
from jupyterhub.services.auth import HubOAuth
from tornado import web

METHODS = ("get", "post", "put", "delete", "patch", "head")
SAMPLES = {"group": "ml", "name": "job-1"}


def hub_auth(prefix: str) -> HubOAuth:
    return HubOAuth(api_url="http://127.0.0.1:1/hub/api", api_token="t", base_url=prefix,
                    hub_prefix="/hub/", login_url="/hub/login")  # fmt: skip


def batch_app(prefix):
    from labfleet_batch.openapi import DOCUMENT
    from labfleet_batch.service import Context, make_app

    ctx = Context(None, None, None, hub_auth(prefix), policy=object())
    return make_app(ctx, prefix), DOCUMENT


def accounting_app(prefix):
    from types import SimpleNamespace

    from labfleet_accounting.openapi import DOCUMENT
    from labfleet_accounting.service import make_app

    # routes only: no request reaches the context (metrics take its registry up front)
    return make_app(SimpleNamespace(registry=None), hub_auth(prefix), prefix), DOCUMENT


def answered(handler: type) -> set[str]:
    return {m for m in METHODS if getattr(handler, m) is not getattr(web.RequestHandler, m)}


def refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


@pytest.mark.parametrize("make", [batch_app, accounting_app])
@pytest.mark.parametrize("prefix", ["/services/x/", "/"])
def test_every_route_is_documented_and_every_path_is_a_route(make, prefix):
    app, document = make(prefix)
    rules = [(r.matcher.regex, r.target) for r in app.wildcard_router.rules]
    assert document["openapi"].startswith("3.")
    hit = set()
    for path, item in document["paths"].items():
        sample = prefix + re.sub(r"\{(\w+)\}", lambda m: SAMPLES[m.group(1)], path).lstrip("/")
        index = next((i for i, (rx, _) in enumerate(rules) if rx.fullmatch(sample)), None)
        assert index is not None, f"{path} of the document is no route of the application"
        hit.add(index)
        handler = rules[index][1]
        documented = {m for m in item if m in METHODS}
        assert documented == answered(handler), (path, handler.__name__)
        # path parameters: declared, and exactly those of the path
        params = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert params == set(re.findall(r"\{(\w+)\}", path)), path
        for method in documented:
            assert item[method]["responses"], (path, method)
    missing = [rules[i][1].__name__ for i in range(len(rules)) if i not in hit]
    assert not missing, f"routes not in the OpenAPI document: {missing}"
    schemas = document["components"]["schemas"]
    for ref in refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas
