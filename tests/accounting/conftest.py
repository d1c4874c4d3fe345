"""Fixtures for the accounting tests: a ledger database on SQLite and on a real PostgreSQL.

``db_url`` is parametrized over both; PostgreSQL comes from a throwaway
server started once per session (``pg.py``). Without PostgreSQL the
``postgresql`` cases are skipped with the reason, except with ``CI=true``
where that is a failure.
"""

from __future__ import annotations

import os
import uuid

import pytest
from labfleet_accounting import db
from labfleet_accounting.ledger import Ledger

from tests.accounting.pg import PostgresUnavailable, start_postgres
from tests.conftest import free_port


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = start_postgres(free_port())
    except PostgresUnavailable as e:
        if in_ci():
            pytest.fail(f"PostgreSQL is required in CI: {e}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable: {e}")
    yield server
    server.stop()


def _fresh_pg_database(server) -> str:
    import psycopg

    name = "t_" + uuid.uuid4().hex[:10]
    with psycopg.connect(
        host="127.0.0.1", port=server.port, user="labfleet", dbname="postgres", autocommit=True
    ) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A URL of an empty database, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return _fresh_pg_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def engine(db_url):
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


class Clock:
    def __init__(self, now: int = 1_700_000_000):
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ledger(engine, clock):
    return Ledger(engine, clock=clock)
