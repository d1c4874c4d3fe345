"""Schemathesis against the batch service's OpenAPI document (issue 10), bounded: a few
examples per operation, positive and negative, a fixed seed. The real service (local
backend, a real hub for the token): no answer is a 5xx, and every job that exists was
answered 201, so no rejected request created one."""

from __future__ import annotations

import asyncio

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from labfleet_batch.openapi import DOCUMENT
from schemathesis import GenerationMode

from tests.batch import test_api_hardening as hardening

groups, qconfig, storage_root = hardening.groups, hardening.qconfig, hardening.storage_root

EXAMPLES = 12


def run_examples(operation, mode, base_url, headers, answers) -> None:
    """EXAMPLES cases of one operation, derandomized (the same cases on every run)."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize=True)  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        answers.append((operation.label, case.method, response.status_code))

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        assert mode == GenerationMode.NEGATIVE, operation.label


def fuzz(document: dict, base_url: str, headers: dict, skip=()) -> list[tuple[str, int, int]]:
    """(operation, method, status) of every answer; the calls block (run it in a thread)."""
    answers: list[tuple[str, int, int]] = []
    schema = schemathesis.openapi.from_dict(document)
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in skip:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_examples(operation, mode, base_url, headers, answers)
    return answers


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
        errors = [a for a in answers if a[2] >= 500]
        assert not errors, errors
        created = sum(1 for label, method, status in answers if method == "POST" and status == 201)
        jobs = (await svc.call("GET", "api/jobs", token)).body["jobs"]
        assert len(jobs) == created, (len(jobs), created)
        for job in jobs:
            await svc.call("DELETE", f"api/jobs/{job['id']}", token)
    assert len(answers) > 50
    print(f"{len(answers)} fuzzed requests, {created} jobs created (all 201), 0 server errors")


pytestmark = pytest.mark.filterwarnings("ignore")
