"""Job records of the local backend on disk: a small SQLite file in the service's state dir.

One row per job: the :class:`~.model.JobRecord` as JSON plus what a restarted
service needs to reconcile it (``extra``: the resources it holds, its devices
and the process id and start time of each running completion). Writes are
tiny and local; they happen on submit, start, each process start and the end,
so a restart loses at most the ``active`` counter, which is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import fields
from pathlib import Path
from typing import Any

from .model import JobRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    grp TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (grp, name)
)
"""
_RECORD_FIELDS = {f.name for f in fields(JobRecord)}


class JobStore:
    """``save(record, extra)``, ``load() -> [(record, extra)]``; ``<state_dir>/jobs.sqlite``."""

    def __init__(self, state_dir: str | os.PathLike):
        path = Path(state_dir)
        # job records name users and their folders: the service's eyes only
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path / "jobs.sqlite"
        # 0600 before SQLite opens it: its -wal and -shm files take the database's mode
        os.close(os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        os.chmod(self.path, 0o600)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL with WAL: a committed row survives a killed service
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(_SCHEMA)

    def save(self, record: JobRecord, extra: dict[str, Any]) -> None:
        self._conn.execute(
            "INSERT INTO jobs (grp, name, record, extra) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (grp, name) DO UPDATE "
            "SET record = excluded.record, extra = excluded.extra",
            (record.group, record.name, json.dumps(record.to_json()), json.dumps(extra)),
        )

    def load(self) -> list[tuple[JobRecord, dict[str, Any]]]:
        rows = self._conn.execute("SELECT record, extra FROM jobs ORDER BY rowid").fetchall()
        out = []
        for raw_record, raw_extra in rows:
            data = json.loads(raw_record)
            record = JobRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})
            out.append((record, json.loads(raw_extra)))
        return out

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), None when it is gone.

    Stored with the pid so a restarted service never mistakes a recycled pid
    for its job.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    after = stat[stat.rindex(")") + 2 :].split()
    if after[0] == "Z":  # a zombie has ended
        return None
    return int(after[19])


def alive(pid: int, start_time: int) -> bool:
    return process_start_time(pid) == start_time
