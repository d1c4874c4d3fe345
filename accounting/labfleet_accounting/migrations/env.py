"""Alembic environment: always runs on the connection handed in by ``db.upgrade``.

No URL is read from alembic.ini or the environment: the service decides
which database to use (traitlets configuration) and passes its connection in
``config.attributes["connection"]``.
"""

from alembic import context

from labfleet_accounting.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE on SQLite
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
