"""A job runs with the software of the place it was submitted from (issue: the README's
``labfleet-batch submit -- python -c "print(42)"`` failed with ``python: not found``)."""

# ruff: noqa: F811  (the fixtures come from test_batch_local_api)
from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import pytest
from labfleet_batch import client as batch_client

from tests.batch.test_batch_local_api import (  # noqa: F401  (fixtures)
    by_prefix,
    groups,
    qconfig,
    service,
    storage_root,
    t4,
    users,
)


@pytest.fixture
def notebook_tool():
    """A program that exists only in "the notebook's environment" (a folder not on the
    service's PATH), readable by every uid: the stand-in for a virtualenv's python."""
    folder = Path(tempfile.mkdtemp(prefix="labfleet-venv-"))
    folder.chmod(0o755)
    tool = folder / "notebook-only-tool"
    tool.write_text('#!/bin/sh\necho "tool says $*"\n')
    tool.chmod(0o755)
    yield folder
    tool.unlink()
    folder.rmdir()


def test_software_env_puts_the_interpreter_first_and_keeps_virtualenvs():
    env = batch_client.software_env(
        {"PATH": "/usr/bin:/opt/venv/bin", "VIRTUAL_ENV": "/opt/venv", "SECRET": "x"},
        executable="/opt/venv/bin/python",
    )
    assert env == {"PATH": "/opt/venv/bin:/usr/bin", "VIRTUAL_ENV": "/opt/venv"}
    # a kernel whose interpreter is not on PATH at all
    env = batch_client.software_env({"PATH": "/usr/bin"}, executable="/home/a/env/bin/python")
    assert env["PATH"] == "/home/a/env/bin:/usr/bin"


async def test_job_finds_the_notebooks_software_and_not_found_names_the_command(
    service, users, groups, notebook_tool, monkeypatch, capsys
):
    _, token = by_prefix(users, "alice")
    c = batch_client.BatchClient(url=service.url, token=token)
    monkeypatch.setenv("PATH", f"{notebook_tool}:/usr/bin:/bin")

    def cli(*argv):
        return batch_client.main(list(argv), client=c)

    # the README's example, with the notebook's own program
    rc = await asyncio.to_thread(cli, "submit", "--", "notebook-only-tool", "42")
    job_id = capsys.readouterr().out.strip()
    assert rc == 0, job_id
    assert await asyncio.to_thread(cli, "wait", job_id) == 0, capsys.readouterr().err
    capsys.readouterr()
    await asyncio.to_thread(cli, "logs", job_id)
    assert capsys.readouterr().out == "tool says 42\n"

    # the interpreter that submitted it is the job's `python`
    job = await asyncio.to_thread(
        c.submit, command=["python", "-c", "import sys; print(sys.prefix)"]
    )
    done = await asyncio.to_thread(c.wait, job["id"], 0.2, 60, None)
    assert done["state"] == "succeeded", done
    assert (await asyncio.to_thread(c.logs, job["id"])).strip() == sys.prefix

    # without the notebook's environment the command is not found, and the job says which
    rc = await asyncio.to_thread(cli, "submit", "--clean-env", "--", "notebook-only-tool")
    failing = capsys.readouterr().out.strip()
    assert await asyncio.to_thread(cli, "wait", failing) == 1
    status = await asyncio.to_thread(c.status, failing)
    assert "exit code 127: command not found" in status["message"], status
    log = await asyncio.to_thread(c.logs, failing)
    assert "notebook-only-tool: command not found" in log, log
    assert ".exit" not in log  # never the platform's internal file
