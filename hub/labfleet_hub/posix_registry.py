"""POSIX ids that are never reused: labfleet's own table in the hub's database.

Notebooks and batch jobs run as ``uid_base + n`` with supplementary gids
``gid_base + m``, and a user's home and a group's folder belong to those ids.
``n`` and ``m`` used to be the hub's database ids, which SQLite reuses: after
the newest user (or group) was deleted, the next one created got its id, and
with it the old user's uid (able to read the old home) or the old group's gid
(able to enter the old group's folder). Now the numbers come from here:

- Each user name and each group name gets a number the first time it is asked
  for, kept in ``labfleet_posix_ids`` (kind, number, name) in the hub's own
  database (through the hub's session, so SQLite and PostgreSQL alike). Rows
  are never deleted; the table makes a number belong to one name only and a
  name to one number only.
- A new name gets its hub id when that is above every number handed out so far
  (the high-water mark in ``labfleet_posix_ids_high``), otherwise the mark + 1:
  a number is never handed out twice, not even one of a deleted name.
- The first use after an upgrade records every existing user and group with
  its hub id, so existing homes and group folders keep their owners.
- A name deleted and created again gets its old number back: homes
  (``home/<user>``) and group folders (``groups/<group>``) are found by name, so
  the name is the account. The hub's names come from IAM, which does not give a
  name to another person; an administrator who does must first move the old
  home aside (``docs/security.md``).

Users of the same number space: :class:`labfleet_hub.api_handlers.PosixIdsHandler`
(for the batch service) and both spawners, all in the hub's process.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

USER = "user"
GROUP = "group"
_HUB_TABLES = {USER: "users", GROUP: "groups"}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS labfleet_posix_ids ("
    " kind VARCHAR(8) NOT NULL, number INTEGER NOT NULL, name VARCHAR(255) NOT NULL,"
    " PRIMARY KEY (kind, number), UNIQUE (kind, name))",
    "CREATE TABLE IF NOT EXISTS labfleet_posix_ids_high ("
    " kind VARCHAR(8) NOT NULL PRIMARY KEY, high INTEGER NOT NULL)",
)

#: Databases (by URL) whose tables this process has made sure of.
_ready: set[str] = set()


def _ensure_tables(db) -> None:
    key = str(db.get_bind().url)
    if key in _ready:
        return
    for statement in _SCHEMA:
        db.execute(text(statement))
    db.commit()
    _ready.add(key)


def _high(db, kind: str) -> int:
    """The high-water mark of ``kind``; the first call records the hub's existing ids."""
    row = db.execute(
        text("SELECT high FROM labfleet_posix_ids_high WHERE kind = :kind"), {"kind": kind}
    ).first()
    if row is not None:
        return int(row[0])
    existing = db.execute(text(f"SELECT name, id FROM {_HUB_TABLES[kind]}")).all()
    for name, hub_id in existing:
        db.execute(
            text("INSERT INTO labfleet_posix_ids (kind, number, name) VALUES (:k, :n, :name)"),
            {"k": kind, "n": int(hub_id), "name": name},
        )
    high = max((int(hub_id) for _, hub_id in existing), default=0)
    db.execute(
        text("INSERT INTO labfleet_posix_ids_high (kind, high) VALUES (:k, :h)"),
        {"k": kind, "h": high},
    )
    return high


def _lookup(db, kind: str, name: str) -> int | None:
    row = db.execute(
        text("SELECT number FROM labfleet_posix_ids WHERE kind = :k AND name = :name"),
        {"k": kind, "name": name},
    ).first()
    return None if row is None else int(row[0])


def _allocate(db, kind: str, name: str, hub_id: int) -> int:
    number = _lookup(db, kind, name)
    if number is not None:
        return number
    high = _high(db, kind)
    number = _lookup(db, kind, name)  # recorded just now with the existing ones
    if number is not None:
        return number
    number = int(hub_id) if int(hub_id) > high else high + 1
    db.execute(
        text("INSERT INTO labfleet_posix_ids (kind, number, name) VALUES (:k, :n, :name)"),
        {"k": kind, "n": number, "name": name},
    )
    db.execute(
        text("UPDATE labfleet_posix_ids_high SET high = :h WHERE kind = :k AND high < :h"),
        {"k": kind, "h": number},
    )
    return number


def numbers(db, kind: str, names: Iterable[tuple[str, int]]) -> dict[str, int]:
    """``{name: number}`` for ``(name, hub id)`` pairs of ``kind``, allocating new ones.

    ``db`` is the hub's SQLAlchemy session; what is pending in it is committed
    with the new numbers (as the hub's own handlers do).
    """
    names = [(str(n), int(i)) for n, i in names]
    for attempt in (1, 2):
        try:
            _ensure_tables(db)
            found = {name: _allocate(db, kind, name, hub_id) for name, hub_id in names}
            db.commit()
            return found
        except IntegrityError:
            # another process (a second hub on the same database) took a number first
            db.rollback()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def posix_ids(user, db=None) -> tuple[int, dict[str, int]]:
    """``(user number, {group name: group number})`` of a hub user (``base +`` them).

    ``user`` is the hub's ``User`` (or its ORM row); ``db`` its session, by
    default ``user.db``. An object with no session (a test's stand-in for a
    hub user) gets its own ``id`` and its groups' ``id`` unchanged.
    """
    db = db if db is not None else getattr(user, "db", None)
    groups = [(g.name, int(g.id)) for g in getattr(user, "groups", None) or []]
    if db is None:
        return int(user.id), dict(groups)
    [user_number] = numbers(db, USER, [(user.name, int(user.id))]).values()
    return user_number, numbers(db, GROUP, groups)
