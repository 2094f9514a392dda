"""SQLAlchemy models: the edit log, adapter versions, their checkpoints, restore commands."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Checkpoint(Base):
    """An adapter state, named by the sha256 of its safetensors file."""

    __tablename__ = "checkpoints"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Blob(Base):
    """A checkpoint file (adapter, manifest or sealed segment) named by its sha256: with
    CHECKPOINT_STORAGE=database every replica fetches checkpoints from here."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Chain(Base):
    """The one row that says which version is current (the head) and which worker may extend the
    history (the trainer lease). A version is added in the transaction that moves the head from
    its parent, conditionally on the head and on the lease epoch: two trainers cannot fork it."""

    __tablename__ = "chain"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    head_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    trainer: Mapped[str | None] = mapped_column(String(200))  # the lease holder's worker name
    epoch: Mapped[int] = mapped_column(Integer, default=0)  # +1 on each takeover: fences the old holder
    lease_expires: Mapped[float] = mapped_column(Float, default=0.0)  # database clock, Unix seconds
    heartbeat: Mapped[float] = mapped_column(Float, default=0.0)  # the holder's last renewal


class Version(Base):
    """One adapter state in the append-only history; `chain.head_version_id` is the current one."""

    __tablename__ = "versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    kind: Mapped[str] = mapped_column(String(16))  # base | edit | batch | restore
    restored_from_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    checkpoint_sha256: Mapped[str] = mapped_column(ForeignKey("checkpoints.sha256"))
    edit_count: Mapped[int] = mapped_column(Integer, default=0)  # edits in this state's history
    # True only on the base version, NULL elsewhere: the unique constraint lets exactly one
    # process create it when API and worker start together.
    is_base: Mapped[bool | None] = mapped_column(Boolean, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Edit(Base):
    """An accepted edit; its status is the source of truth the queue is checked against."""

    __tablename__ = "edits"
    __table_args__ = (UniqueConstraint("idempotency_key", "idempotency_position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    mode: Mapped[str] = mapped_column(String(16), default="continual")
    subject: Mapped[str] = mapped_column(Text)
    relation: Mapped[str] = mapped_column(Text)
    object: Mapped[str] = mapped_column(Text)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # baft_core EditRequest.to_dict()
    error: Mapped[str | None] = mapped_column(Text)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    idempotency_position: Mapped[int | None] = mapped_column(Integer)
    fingerprint: Mapped[str | None] = mapped_column(String(64))  # body hash, for key reuse checks
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_epoch: Mapped[int | None] = mapped_column(Integer)  # the lease epoch that set `applying`
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    steps: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    train_seconds: Mapped[float | None] = mapped_column(Float)
    losses: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    basis_weights: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Restore(Base):
    """A restore command: the worker that holds the trainable adapter carries it out."""

    __tablename__ = "restores"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")  # queued|done|failed
    # The newest edit id when the restore was accepted: it runs after those edits, before later ones.
    after_edit_id: Mapped[int] = mapped_column(Integer, default=0)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
