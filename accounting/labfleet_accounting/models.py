"""The accounting schema: usage intervals, collector checkpoints, budgets, quota caps, audit.

Times are whole seconds since the epoch (UTC) in integer columns: portable
arithmetic in SQL on both SQLite and PostgreSQL (reports compute overlaps of
intervals with periods in the database), and no time-zone ambiguity. One
second is finer than anything accounting is billed in.

The schema is created and changed only by the Alembic migrations shipped in
``labfleet_accounting/migrations``; these models must stay in step with them
(a unit test compares the two).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so that migrations can refer to them on both dialects.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UsageInterval(Base):
    """One pod or local server, from its start to its end (``end_s`` NULL while it runs).

    The natural key ``(source, uid, start_s)`` makes every write idempotent: a
    replayed start, a duplicate watch event or a reconciliation after a restart
    lands on the same row instead of a new one.
    """

    __tablename__ = "usage_interval"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(32))  # "k8s", "local", ...
    uid: Mapped[str] = mapped_column(String(255))  # pod UID, or local server id
    start_s: Mapped[int] = mapped_column(BigInteger)
    end_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Last time a collector saw it running: the end used when it vanished unseen.
    last_seen_s: Mapped[int] = mapped_column(BigInteger)
    user_name: Mapped[str] = mapped_column(String(255))
    group_name: Mapped[str] = mapped_column(String(255), default="")
    kind: Mapped[str] = mapped_column(String(16))  # "interactive" or "batch"
    profile: Mapped[str] = mapped_column(String(255), default="")
    accelerator: Mapped[str] = mapped_column(String(255), default="")  # catalogue name
    accelerator_kind: Mapped[str] = mapped_column(String(8), default="")  # gpu, mig, fpga
    accelerator_count: Mapped[int] = mapped_column(Integer, default=0)
    gpu_fraction: Mapped[float] = mapped_column(Float, default=1.0)  # of one GPU, per unit
    cpu: Mapped[float] = mapped_column(Float, default=0.0)  # cores requested
    memory: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes requested
    namespace: Mapped[str] = mapped_column(String(255), default="")
    name: Mapped[str] = mapped_column(String(255), default="")

    __table_args__ = (
        UniqueConstraint("source", "uid", "start_s"),
        Index(None, "start_s"),
        Index(None, "end_s"),
        Index(None, "group_name", "start_s"),
        Index(None, "user_name", "start_s"),
    )


class CollectorCheckpoint(Base):
    """Where a collector stopped reading: a Kubernetes resourceVersion, a spool offset."""

    __tablename__ = "collector_checkpoint"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[str] = mapped_column(Text, default="")
    updated_s: Mapped[int] = mapped_column(BigInteger, default=0)


class Budget(Base):
    """A group's GPU-hour budget per calendar period."""

    __tablename__ = "budget"

    group_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    period: Mapped[str] = mapped_column(String(16), default="month")  # month, quarter, year
    gpu_hours: Mapped[float] = mapped_column(Float)
    warn_fraction: Mapped[float] = mapped_column(Float, default=0.8)
    enforce: Mapped[bool] = mapped_column(Boolean, default=True)


class QuotaCap(Base):
    """The most a group admin may set for one flavor and resource of their ClusterQueue."""

    __tablename__ = "quota_cap"

    group_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    flavor: Mapped[str] = mapped_column(String(255), primary_key=True)
    resource: Mapped[str] = mapped_column(String(255), primary_key=True)
    max_nominal: Mapped[str] = mapped_column(String(64))  # a Kubernetes quantity
    max_borrowing: Mapped[str] = mapped_column(String(64), default="0")


class AuditEntry(Base):
    """Who changed what, when: quota changes, budget and cap changes."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at_s: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON: before/after

    __table_args__ = (Index(None, "target", "at_s"),)
