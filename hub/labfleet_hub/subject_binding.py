"""Each hub user belongs to one identity-provider account: the ``sub`` of its first login.

JupyterHub lowercases user names, so IAM's ``Alice`` and ``alice`` (two
accounts, two ``sub`` claims) would be one hub user, with one home and one
uid; and an IAM account deleted and created again under the same name (a new
``sub``) would walk into the old one's files. So the first login of a hub
name records its ``sub`` in ``labfleet_subjects`` (name, sub, issuer, bound
at), in the hub's own database through the hub's session (SQLite and
PostgreSQL alike, like :mod:`labfleet_hub.posix_registry`), and every later
login of that name must bring the same ``sub``. The row is independent of
``auth_state`` (which may be off) and of the hub's ``users`` table: a hub user
deleted and created again keeps its binding, as it keeps its uid and home.

To give a name to another account on purpose (a person's IAM account was
recreated), an administrator moves the old home aside and runs ``labfleet
release-name alice`` (:func:`release`; docs/identity.md).
"""

from __future__ import annotations

import time

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS labfleet_subjects ("
    " name VARCHAR(255) NOT NULL PRIMARY KEY, sub VARCHAR(255) NOT NULL,"
    " issuer VARCHAR(1024) NOT NULL, bound_at INTEGER NOT NULL)"
)

#: Databases (by URL) whose table this process has made sure of.
_ready: set[str] = set()

#: OpenID Connect Core 1.0, 2: ``sub`` "MUST NOT exceed 255 ASCII characters in length".
MAX_SUB = 255


class InvalidSubject(ValueError):
    """The identity provider sent no usable subject; the message names the claim."""


def check_subject(claim: str, value) -> str:
    """``value`` as a subject, or :class:`InvalidSubject` naming ``claim``."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidSubject(
            f"the identity provider sent no {claim!r} claim (got {type(value).__name__}); "
            "labfleet binds each hub user to it"
        )
    if len(value) > MAX_SUB or not value.isascii():
        raise InvalidSubject(f"the {claim!r} claim is not at most {MAX_SUB} ASCII characters")
    return value


def _ensure_table(db) -> None:
    key = str(db.get_bind().url)
    if key in _ready:
        return
    db.execute(text(_SCHEMA))
    db.commit()
    _ready.add(key)


def bound_subject(db, name: str) -> str | None:
    """The ``sub`` that hub user ``name`` is bound to, or None."""
    _ensure_table(db)
    row = db.execute(
        text("SELECT sub FROM labfleet_subjects WHERE name = :name"), {"name": name}
    ).first()
    return None if row is None else str(row[0])


def bind(db, name: str, sub: str, issuer: str = "") -> str:
    """Bind ``name`` to ``sub`` unless it is bound already; returns the bound ``sub``.

    The caller compares the result with ``sub``: anything else means another
    account owns the name. Two first logins at once: the database keeps one.
    """
    for attempt in (1, 2):
        found = bound_subject(db, name)
        if found is not None:
            return found
        try:
            db.execute(
                text(
                    "INSERT INTO labfleet_subjects (name, sub, issuer, bound_at)"
                    " VALUES (:name, :sub, :issuer, :at)"
                ),
                {"name": name, "sub": sub, "issuer": issuer[:1024], "at": int(time.time())},
            )
            db.commit()
            return sub
        except IntegrityError:
            db.rollback()  # another hub process bound it first: read theirs
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def release(db, name: str) -> str | None:
    """Delete ``name``'s binding; the ``sub`` it was bound to, or None if it had none.

    The next login of ``name`` binds it again, to whichever account that is. The
    name keeps its uid and home (:mod:`labfleet_hub.posix_registry`): whoever logs
    in next gets them, so the caller moves the old home aside first if it is not
    the new account's.
    """
    found = bound_subject(db, name)
    if found is not None:
        db.execute(text("DELETE FROM labfleet_subjects WHERE name = :name"), {"name": name})
        db.commit()
    return found
