"""Database reads and writes used by the API and the worker."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import Checkpoint, Edit, Restore, Version, utcnow

FINAL = ("applied", "failed")


# ----- edits -----
def add_edits(
    session: Session,
    items: list[dict[str, Any]],
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
) -> list[Edit]:
    edits = [
        Edit(
            status="queued",
            attempts=0,
            idempotency_key=idempotency_key,
            idempotency_position=index if idempotency_key else None,
            fingerprint=fingerprint,
            **item,
        )
        for index, item in enumerate(items)
    ]
    session.add_all(edits)
    session.commit()
    return edits


def edits_by_key(session: Session, key: str) -> list[Edit]:
    return list(
        session.scalars(select(Edit).where(Edit.idempotency_key == key).order_by(Edit.idempotency_position))
    )


def get_edit(session: Session, edit_id: int) -> Edit | None:
    return session.get(Edit, edit_id)


def list_edits(session: Session, status: str | None, limit: int, offset: int) -> tuple[list[Edit], int]:
    query = select(Edit)
    counted = select(func.count()).select_from(Edit)
    if status:
        query, counted = query.where(Edit.status == status), counted.where(Edit.status == status)
    items = list(session.scalars(query.order_by(Edit.id).limit(limit).offset(offset)))
    return items, session.scalar(counted) or 0


def pending_edits(session: Session, limit: int, exclude: Iterable[int] = ()) -> list[Edit]:
    """Edits not yet applied, in arrival order (the in-process queue)."""
    query = select(Edit).where(Edit.status.in_(("queued", "applying")))
    excluded = list(exclude)
    if excluded:
        query = query.where(Edit.id.not_in(excluded))
    return list(session.scalars(query.order_by(Edit.id).limit(limit)))


def edits_to_publish(session: Session, stale_before: datetime, limit: int = 500) -> list[Edit]:
    """Queued edits never written to the stream, or written long ago and still not applied."""
    query = select(Edit).where(
        Edit.status == "queued", or_(Edit.published_at.is_(None), Edit.published_at < stale_before)
    )
    return list(session.scalars(query.order_by(Edit.id).limit(limit)))


def mark_published(session: Session, edit_ids: list[int]) -> None:
    if edit_ids:
        session.execute(update(Edit).where(Edit.id.in_(edit_ids)).values(published_at=utcnow()))
        session.commit()


def reset_interrupted(session: Session) -> int:
    """Edits left `applying` by a worker that died: back to queued, to be applied again."""
    result = session.execute(update(Edit).where(Edit.status == "applying").values(status="queued"))
    session.commit()
    return result.rowcount


def version_edit_ids(session: Session, version_id: int) -> list[int]:
    return list(session.scalars(select(Edit.id).where(Edit.version_id == version_id).order_by(Edit.id)))


# ----- versions and checkpoints -----
def current_version(session: Session) -> Version | None:
    return session.scalars(select(Version).order_by(Version.id.desc()).limit(1)).first()


def get_version(session: Session, version_id: int) -> Version | None:
    return session.get(Version, version_id)


def list_versions(session: Session, limit: int, offset: int) -> tuple[list[Version], int]:
    items = list(session.scalars(select(Version).order_by(Version.id).limit(limit).offset(offset)))
    return items, session.scalar(select(func.count()).select_from(Version)) or 0


def ensure_checkpoint(session: Session, sha256: str, path: str, size: int) -> None:
    """Adds the checkpoint row unless it exists (committed separately: other processes may race)."""
    if session.get(Checkpoint, sha256) is not None:
        return
    session.add(Checkpoint(sha256=sha256, path=path, size=size))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()


def new_version(
    session: Session,
    kind: str,
    checkpoint_sha256: str,
    edit_count: int,
    parent_id: int | None,
    restored_from_id: int | None = None,
) -> Version:
    """Adds (does not commit) a version row."""
    version = Version(
        kind=kind,
        checkpoint_sha256=checkpoint_sha256,
        edit_count=edit_count,
        parent_id=parent_id,
        restored_from_id=restored_from_id,
        is_base=True if kind == "base" else None,
    )
    session.add(version)
    session.flush()
    return version


def ensure_base_version(sessions: sessionmaker[Session], save_base) -> Version:
    """The unedited model as the first version. `save_base()` writes its checkpoint and returns
    (sha256, path, size); called only when there is no version yet."""
    with sessions() as session:
        base = session.scalars(select(Version).where(Version.is_base.is_(True))).first()
        if base is not None:
            return base
        sha256, path, size = save_base()
        ensure_checkpoint(session, sha256, path, size)
        try:
            base = new_version(session, "base", sha256, 0, None)
            session.commit()
        except IntegrityError:  # the other process created it first
            session.rollback()
            base = session.scalars(select(Version).where(Version.is_base.is_(True))).one()
        return base


# ----- restores -----
def add_restore(session: Session, target_version_id: int) -> Restore:
    restore = Restore(target_version_id=target_version_id, status="queued")
    session.add(restore)
    session.commit()
    return restore


def queued_restores(session: Session) -> list[Restore]:
    return list(session.scalars(select(Restore).where(Restore.status == "queued").order_by(Restore.id)))
