"""Schemathesis against the batch service's OpenAPI document (issue 10), bounded: a few
examples per operation, positive and negative, a fixed seed. The real service (local
backend, a real hub for the token): no answer is a 5xx, and every job that exists was
answered 201, so no rejected request created one."""

from __future__ import annotations

import asyncio

import pytest
from labfleet_batch.openapi import DOCUMENT

from tests.batch import test_api_hardening as hardening
from tests.fuzz import fuzz

groups, qconfig, storage_root = hardening.groups, hardening.qconfig, hardening.storage_root


async def test_fuzzed_requests_get_no_server_error_and_create_nothing_when_refused(
    hub, groups, qconfig, storage_root
):
    user = hardening.unique("fuzz")
    token = hub.add_user(user, [groups["phy"]])
    async with hardening.capped_service(hub, qconfig, storage_root) as svc:
        base = svc.url.rstrip("/")
        headers = {"Authorization": f"token {token}"}
        answers = await asyncio.wait_for(
            asyncio.to_thread(fuzz, DOCUMENT, base, headers, {"GET /oauth_callback"}), 120
        )
        errors = [a for a in answers if a.status >= 500]
        assert not errors, errors
        created = sum(1 for a in answers if a.method == "POST" and a.status == 201)
        jobs = (await svc.call("GET", "api/jobs", token)).body["jobs"]
        assert len(jobs) == created, (len(jobs), created)
        for job in jobs:
            await svc.call("DELETE", f"api/jobs/{job['id']}", token)
    assert len(answers) > 50
    print(f"{len(answers)} fuzzed requests, {created} jobs created (all 201), 0 server errors")


pytestmark = pytest.mark.filterwarnings("ignore")
