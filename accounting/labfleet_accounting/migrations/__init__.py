"""Alembic migrations of the accounting schema (run by :func:`labfleet_accounting.db.upgrade`)."""
