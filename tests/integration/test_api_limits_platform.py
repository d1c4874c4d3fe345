"""API hardening (issue 10) on the real platform (`labfleet up`): request bodies of
1 MiB and more sent to the batch and accounting services through the hub's proxy
(configurable-http-proxy) get the services' JSON 413 naming the limit, not the
proxy's 503 page; both services publish their OpenAPI document there."""

from __future__ import annotations

import json
import re

from labfleet_hub.bodylimit import MAX_BODY_BYTES

from .conftest import login
from .test_platform_login import api_token, http


def test_oversize_bodies_get_the_services_json_413_through_the_proxy(platform, page):
    login(page, platform, "bob", "bob-pass")
    page.wait_for_url(re.compile(r"/hub/spawn"))
    token = api_token(page, platform)
    targets = (
        ("POST", f"{platform.url}/services/batch/api/jobs", "script"),
        ("PUT", f"{platform.url}/services/accounting/api/budgets/cms", "pad"),
    )
    for method, url, field in targets:
        for size in (MAX_BODY_BYTES, 10 * 1024 * 1024):
            body = json.dumps({field: "x" * size}).encode()
            status, text = http(method, url, token, body)
            assert status == 413, (url, size, status, text[:300])
            answer = json.loads(text)
            assert answer["status"] == 413 and str(MAX_BODY_BYTES) in answer["message"]
    for service in ("batch", "accounting"):
        status, text = http("GET", f"{platform.url}/services/{service}/api/openapi.json")
        assert status == 200, text[:300]
        document = json.loads(text)
        assert document["openapi"].startswith("3.")
        assert document["servers"] == [{"url": f"/services/{service}"}]
