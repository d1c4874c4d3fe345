"""Schemathesis against the accounting service's OpenAPI document (issue 10), bounded:
a few examples per operation, positive and negative, derandomized. The real tornado
application on loopback behind a real HubOAuth (the fake hub of test_service_authz),
as a platform admin: no answer is a 5xx, and only budgets answered 200 exist."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from labfleet_accounting import db
from labfleet_accounting.models import Budget
from labfleet_accounting.openapi import DOCUMENT
from schemathesis import GenerationMode
from sqlalchemy import select

from tests.accounting import test_service_authz as authz

fake_hub, service = authz.fake_hub, authz.service

EXAMPLES = 12


def run_examples(operation, mode, base_url, headers, answers) -> None:
    """EXAMPLES cases of one operation, derandomized (the same cases on every run)."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize=True)  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        answers.append((operation.label, dict(case.path_parameters or {}), response.status_code))

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        assert mode == GenerationMode.NEGATIVE, operation.label


def fuzz(base_url: str, headers: dict) -> list[tuple[str, dict, int]]:
    """(operation, path parameters, status) of every answer; the calls block."""
    answers: list[tuple[str, dict, int]] = []
    for result in schemathesis.openapi.from_dict(DOCUMENT).get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_examples(operation, mode, base_url, headers, answers)
    return answers


async def test_fuzzed_requests_get_no_server_error_and_set_nothing_when_refused(service, tmp_path):
    headers = {"Authorization": "token root-token"}
    answers = await asyncio.wait_for(asyncio.to_thread(fuzz, service.rstrip("/"), headers), 120)
    errors = [a for a in answers if a[2] >= 500]
    assert not errors, errors
    accepted = {unquote(p["group"]) for label, p, status in answers
                if label == "PUT /api/budgets/{group}" and status == 200}  # fmt: skip
    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")  # the service fixture's ledger
    with engine.connect() as connection:
        stored = {row.group_name for row in connection.execute(select(Budget))}
    engine.dispose()
    assert stored == accepted, sorted(map(ascii, stored ^ accepted))[:5]
    assert len(answers) > 50
    print(f"{len(answers)} fuzzed requests, {len(accepted)} budgets set (all 200), no 5xx")


pytestmark = pytest.mark.filterwarnings("ignore")
