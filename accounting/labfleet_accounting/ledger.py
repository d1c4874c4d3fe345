"""The usage ledger: idempotent writes of intervals, reconciliation, checkpoints.

Exactly-once comes from three rules, all enforced by the database:

1. every write is an upsert on the natural key ``(source, uid, start_s)``, so
   replaying a start or a stop changes nothing the second time;
2. a close only fills ``end_s`` where it is still NULL: the first end wins and
   a duplicate (or late) stop cannot move it;
3. a collector saves its checkpoint in the same transaction as the events it
   read, and on restart :meth:`Ledger.reconcile` compares what is running now
   with the open intervals: an open interval whose pod or server is gone is
   closed at the last time it was seen, a running one missing from the ledger
   is opened.

The upserts use the dialects' ``INSERT ... ON CONFLICT`` (SQLite >= 3.24 and
PostgreSQL), through SQLAlchemy's dialect-specific ``insert``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from sqlalchemy import Engine, func, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from .models import CollectorCheckpoint, UsageInterval
from .records import Event, Usage, fold

_KEY = ["source", "uid", "start_s"]
# Rows per INSERT statement; keeps SQLite under its bound-parameter limit (32766).
_CHUNK = 500


def _insert(dialect: str):
    if dialect == "sqlite":
        return sqlite.insert
    if dialect == "postgresql":
        return postgresql.insert
    raise ValueError(f"database {dialect!r} is not supported; use SQLite or PostgreSQL")


def _chunks(items: Sequence, size: int = _CHUNK):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Ledger:
    """Writes and reads usage intervals on ``engine`` (schema already migrated)."""

    def __init__(self, engine: Engine, clock=time.time):
        self.engine = engine
        self.clock = clock
        self._insert = _insert(engine.dialect.name)

    def now(self) -> int:
        return int(self.clock())

    # -- writes ----------------------------------------------------------------

    def _open(self, connection, usages: Iterable[Usage], seen: int) -> None:
        rows = [{**u.row(), "end_s": None, "last_seen_s": max(seen, u.start)} for u in usages]
        if rows:
            # executemany of one cached statement: compiled once, not per batch.
            stmt = self._insert(UsageInterval).on_conflict_do_nothing(index_elements=_KEY)
            connection.execute(stmt, rows)

    def _close(self, connection, closes: Iterable[tuple[Usage, int]]) -> None:
        rows = [{**u.row(), "end_s": end, "last_seen_s": end} for u, end in closes]
        if rows:
            stmt = self._insert(UsageInterval)
            stmt = stmt.on_conflict_do_update(
                index_elements=_KEY,
                set_={"end_s": stmt.excluded.end_s, "last_seen_s": stmt.excluded.last_seen_s},
                where=UsageInterval.end_s.is_(None),
            )
            connection.execute(stmt, rows)

    def apply(
        self,
        events: Iterable[Event],
        checkpoint: tuple[str, str] | None = None,
        seen: int | None = None,
    ) -> None:
        """Apply a batch of events and, atomically with it, save ``(source, position)``."""
        folded = fold(events)
        seen = self.now() if seen is None else seen
        with self.engine.begin() as connection:
            if folded.opened:
                self._open(connection, folded.opened.values(), seen)
            if folded.closed:
                self._close(connection, folded.closed.values())
            if checkpoint is not None:
                self._save_checkpoint(connection, *checkpoint)

    def start(self, usage: Usage) -> None:
        self.apply([Event("start", usage, usage.start)])

    def stop(self, usage: Usage, end: int) -> None:
        self.apply([Event("stop", usage, end)])

    def touch(self, source: str, seen: int | None = None) -> int:
        """Record that every open interval of ``source`` is still running now."""
        seen = self.now() if seen is None else seen
        with self.engine.begin() as connection:
            result = connection.execute(
                update(UsageInterval)
                .where(UsageInterval.source == source, UsageInterval.end_s.is_(None))
                .values(last_seen_s=seen)
            )
            return result.rowcount

    def reconcile(
        self,
        source: str,
        running: Iterable[Usage],
        finished: Iterable[tuple[Usage, int]] = (),
        checkpoint: str | None = None,
        seen: int | None = None,
    ) -> dict[str, int]:
        """Make the open intervals of ``source`` match a full listing of what runs now.

        ``running``: everything of ``source`` running now; ``finished``: things
        still listed but ended, with their end (a completed Job's pod). Open
        intervals not in ``running`` are closed at their ``last_seen_s``.
        Returns counts: opened, closed_missing, closed_finished.
        """
        seen = self.now() if seen is None else seen
        running = {u.key: u for u in running}
        finished = list(finished)
        with self.engine.begin() as connection:
            open_keys = set(
                connection.execute(
                    select(UsageInterval.source, UsageInterval.uid, UsageInterval.start_s).where(
                        UsageInterval.source == source, UsageInterval.end_s.is_(None)
                    )
                ).all()
            )
            finished_keys = {u.key for u, _ in finished}
            missing = [k for k in open_keys if k not in running and k not in finished_keys]
            for chunk in _chunks(missing):
                connection.execute(
                    update(UsageInterval)
                    .where(
                        tuple_(UsageInterval.source, UsageInterval.uid, UsageInterval.start_s).in_(
                            chunk
                        ),
                        UsageInterval.end_s.is_(None),
                    )
                    .values(end_s=UsageInterval.last_seen_s)
                )
            new = [u for k, u in running.items() if k not in open_keys]
            self._open(connection, new, seen)
            if finished:
                self._close(connection, finished)
            # Everything still running was seen now.
            connection.execute(
                update(UsageInterval)
                .where(UsageInterval.source == source, UsageInterval.end_s.is_(None))
                .values(last_seen_s=seen)
            )
            if checkpoint is not None:
                self._save_checkpoint(connection, source, checkpoint)
        return {
            "opened": len(new),
            "closed_missing": len(missing),
            "closed_finished": len(finished),
        }

    # -- checkpoints -----------------------------------------------------------

    def _save_checkpoint(self, connection, source: str, position: str) -> None:
        stmt = self._insert(CollectorCheckpoint).values(
            source=source, position=position, updated_s=self.now()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["source"],
            set_={"position": stmt.excluded.position, "updated_s": stmt.excluded.updated_s},
        )
        connection.execute(stmt)

    def save_checkpoint(self, source: str, position: str) -> None:
        with self.engine.begin() as connection:
            self._save_checkpoint(connection, source, position)

    def checkpoint(self, source: str) -> str | None:
        with self.engine.connect() as connection:
            return connection.execute(
                select(CollectorCheckpoint.position).where(CollectorCheckpoint.source == source)
            ).scalar_one_or_none()

    # -- reads -----------------------------------------------------------------

    def intervals(self, source: str | None = None) -> list[dict]:
        """Every interval (of ``source``) as a dict, oldest first: for tests and exports."""
        table = UsageInterval.__table__
        query = select(table).order_by(table.c.start_s, table.c.source, table.c.uid)
        if source is not None:
            query = query.where(table.c.source == source)
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def open_count(self, source: str | None = None) -> int:
        query = select(func.count()).where(UsageInterval.end_s.is_(None))
        if source is not None:
            query = query.where(UsageInterval.source == source)
        with self.engine.connect() as connection:
            return connection.execute(query).scalar_one()
