"""Schemathesis against a service's OpenAPI document, bounded and derandomized: the
same few cases per operation on every run, positive and negative (issue 10)."""

from __future__ import annotations

from typing import NamedTuple

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = 12


class Answer(NamedTuple):
    label: str  # "PUT /api/budgets/{group}"
    method: str
    path_parameters: dict
    status: int


def _run_examples(operation, mode, base_url: str, headers: dict, answers: list) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize=True)  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        answers.append(
            Answer(
                operation.label, case.method, dict(case.path_parameters or {}), response.status_code
            )  # fmt: skip
        )

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        assert mode == GenerationMode.NEGATIVE, operation.label


def fuzz(document: dict, base_url: str, headers: dict, skip=()) -> list[Answer]:
    """Every answer to the fuzzed requests; the calls block (run it in a thread)."""
    answers: list[Answer] = []
    for result in schemathesis.openapi.from_dict(document).get_all_operations():
        operation = result.ok()
        if operation.label in skip:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _run_examples(operation, mode, base_url, headers, answers)
    return answers
