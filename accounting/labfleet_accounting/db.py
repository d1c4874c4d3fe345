"""Engines and schema migrations.

``make_engine`` knows the two supported databases: SQLite (the single-node
default; WAL so that reports can read while a collector writes) and
PostgreSQL through psycopg 3 (``postgresql+psycopg://...``). ``upgrade``
runs the Alembic migrations shipped in this package on that engine; the
service calls it at start, and ``labfleet-accounting migrate`` runs it alone.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event


def make_engine(url: str, echo: bool = False) -> Engine:
    """An engine for ``url``; ``sqlite:///path`` and ``postgresql+psycopg://`` are tested."""
    if url.startswith("postgresql://"):
        # Without a driver name SQLAlchemy picks psycopg2, which labfleet does not install.
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            if ":memory:" not in url:
                cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL with WAL: a committed transaction survives a killed process
            # (only a power loss can drop the last commits).
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


def _alembic_config(connection) -> Config:
    config = Config()
    location = resources.files("labfleet_accounting") / "migrations"
    config.set_main_option("script_location", str(location))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; returns the revision now current."""
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), revision)
    return current_revision(engine)


def downgrade(engine: Engine, revision: str) -> str | None:
    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), revision)
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    with create_engine("sqlite://").connect() as connection:
        return ScriptDirectory.from_config(_alembic_config(connection)).get_current_head()
