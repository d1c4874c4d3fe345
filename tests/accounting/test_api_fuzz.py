"""Schemathesis against the accounting service's OpenAPI document (issue 10), bounded:
a few examples per operation, positive and negative, derandomized. The real tornado
application on loopback behind a real HubOAuth (the fake hub of test_service_authz),
as a platform admin: no answer is a 5xx, and only budgets answered 200 exist."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import pytest
from labfleet_accounting import db
from labfleet_accounting.models import Budget
from labfleet_accounting.openapi import DOCUMENT
from sqlalchemy import select

from tests.accounting import test_service_authz as authz
from tests.fuzz import fuzz

fake_hub, service = authz.fake_hub, authz.service


async def test_fuzzed_requests_get_no_server_error_and_set_nothing_when_refused(service, tmp_path):
    headers = {"Authorization": "token root-token"}
    answers = await asyncio.wait_for(
        asyncio.to_thread(fuzz, DOCUMENT, service.rstrip("/"), headers), 120
    )
    errors = [a for a in answers if a.status >= 500]
    assert not errors, errors
    accepted = {unquote(a.path_parameters["group"]) for a in answers
                if a.label == "PUT /api/budgets/{group}" and a.status == 200}  # fmt: skip
    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")  # the service fixture's ledger
    with engine.connect() as connection:
        stored = {row.group_name for row in connection.execute(select(Budget))}
    engine.dispose()
    assert stored == accepted, sorted(map(ascii, stored ^ accepted))[:5]
    assert len(answers) > 50
    print(f"{len(answers)} fuzzed requests, {len(accepted)} budgets set (all 200), no 5xx")


pytestmark = pytest.mark.filterwarnings("ignore")
