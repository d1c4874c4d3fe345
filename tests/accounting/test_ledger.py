"""The ledger on SQLite and on a real PostgreSQL: migrations, idempotent writes, reconciliation."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from labfleet_accounting import db
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.models import Base
from labfleet_accounting.records import START, STOP, Event, Usage
from sqlalchemy import inspect


def usage(uid="pod-1", start=1000, **kw) -> Usage:
    fields = dict(source="k8s", uid=uid, start=start, user="alice", group="ml", kind="batch")
    fields.update(kw)
    return Usage(**fields)


def test_migrations_create_the_model_schema_and_downgrade(engine):
    assert db.current_revision(engine) == db.head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"usage_interval", "collector_checkpoint", "budget", "quota_cap", "audit_log"} <= tables
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    db.downgrade(engine, "base")
    assert "usage_interval" not in inspect(engine).get_table_names()
    db.upgrade(engine)  # and back: the migration is repeatable
    assert db.current_revision(engine) == db.head_revision()


def test_start_then_stop_is_one_closed_interval(ledger):
    u = usage(cpu=2.0, memory=4 << 30, accelerator="a100", accelerator_count=2)
    ledger.start(u)
    assert ledger.open_count() == 1
    ledger.stop(u, 4600)
    [row] = ledger.intervals()
    assert (row["start_s"], row["end_s"], row["user_name"], row["group_name"]) == (
        1000,
        4600,
        "alice",
        "ml",
    )
    assert row["accelerator_count"] == 2 and row["memory"] == 4 << 30
    assert ledger.open_count() == 0


def test_duplicates_are_ignored_and_the_first_end_wins(ledger):
    u = usage()
    for _ in range(3):
        ledger.start(u)
    ledger.stop(u, 2000)
    ledger.stop(u, 9999)  # a late duplicate stop
    ledger.start(u)  # a replayed start after the stop
    [row] = ledger.intervals()
    assert row["end_s"] == 2000


def test_stop_without_start_writes_the_whole_interval(ledger):
    ledger.stop(usage(uid="p", start=50, profile="cpu-small"), 80)
    [row] = ledger.intervals()
    assert (row["start_s"], row["end_s"], row["profile"]) == (50, 80, "cpu-small")


def test_same_uid_restarted_is_a_second_interval(ledger):
    # A local server name is reused across restarts: start time tells them apart.
    ledger.stop(usage(uid="alice/", start=10, source="local"), 20)
    ledger.start(usage(uid="alice/", start=30, source="local"))
    rows = ledger.intervals()
    assert [(r["start_s"], r["end_s"]) for r in rows] == [(10, 20), (30, None)]


def test_batch_apply_folds_and_saves_checkpoint(ledger):
    a, b = usage("a"), usage("b")
    ledger.apply(
        [Event(START, a, 1000), Event(START, b, 1000), Event(STOP, a, 1500), Event(START, a, 1000)],
        checkpoint=("k8s", "rv-42"),
    )
    assert ledger.checkpoint("k8s") == "rv-42"
    rows = {r["uid"]: r["end_s"] for r in ledger.intervals()}
    assert rows == {"a": 1500, "b": None}
    ledger.save_checkpoint("k8s", "rv-43")
    assert ledger.checkpoint("k8s") == "rv-43"
    assert ledger.checkpoint("local") is None


def test_checkpoint_is_not_saved_when_the_batch_fails(ledger):
    bad = usage("x", kind=None)  # NOT NULL violation inside the transaction
    with pytest.raises(Exception):  # noqa: B017 - dialects raise different IntegrityErrors
        ledger.apply([Event(START, usage("ok"), 1000), Event(START, bad, 1000)], ("k8s", "rv-9"))
    assert ledger.checkpoint("k8s") is None
    assert ledger.intervals() == [], "a failed batch must leave nothing behind"


def test_reconcile_closes_missing_at_last_seen_and_opens_new(ledger, clock):
    gone, stays, done = usage("gone", 100), usage("stays", 100), usage("done", 100)
    for u in (gone, stays, done):
        ledger.start(u)
    clock.now = 500
    assert ledger.touch("k8s") == 3
    ledger.start(usage("other-source", 100, source="local"))
    clock.now = 900  # the service was down between 500 and 900
    new = usage("new", 700)
    counts = ledger.reconcile("k8s", running=[stays, new], finished=[(done, 650)], checkpoint="rv")
    assert counts == {"opened": 1, "closed_missing": 1, "closed_finished": 1}
    rows = {r["uid"]: (r["start_s"], r["end_s"], r["last_seen_s"]) for r in ledger.intervals()}
    assert rows == {
        "gone": (100, 500, 500),
        "stays": (100, None, 900),
        "done": (100, 650, 650),
        "new": (700, None, 900),
        "other-source": (100, None, 500),  # another source is left alone
    }
    assert ledger.checkpoint("k8s") == "rv"
    # Reconciling again with the same listing changes nothing.
    assert ledger.reconcile("k8s", running=[stays, new], finished=[(done, 650)])["opened"] == 0
    assert len(ledger.intervals()) == 5


def test_reconcile_scales_past_the_statement_chunk(ledger):
    many = [usage(f"p{i}", 100) for i in range(1234)]
    ledger.apply([Event(START, u, 100) for u in many], seen=200)
    counts = ledger.reconcile("k8s", running=many[:1000], seen=300)
    assert counts["closed_missing"] == 234
    ends = [r["end_s"] for r in ledger.intervals()]
    assert ends.count(200) == 234 and ends.count(None) == 1000


def test_engine_url_without_driver_uses_psycopg():
    engine = db.make_engine("postgresql://nobody@127.0.0.1:1/x")
    assert engine.dialect.driver == "psycopg"


def test_unsupported_dialect_is_refused():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="SQLite or PostgreSQL"):
        Ledger(SimpleNamespace(dialect=SimpleNamespace(name="mysql")))
