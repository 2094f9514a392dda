"""Database reads and writes used by the API and the worker.

The history is one chain: `chain.head_version_id` names the current version and only the holder
of the trainer lease (`chain.trainer`, `chain.epoch`) may move it, by a conditional update from
the version it built on. Edits and restores are accepted in one total order (their inserts are
serialised, so ids commit in order) and applied in that order."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, Result, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import Blob, Chain, Checkpoint, Edit, Restore, Version, utcnow

FINAL = ("applied", "failed")
PENDING = ("queued", "applying")
CHAIN_ID = 1
LOG_LOCK_KEY = 0x62616675  # PostgreSQL advisory lock serialising inserts into the log


def _rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE matched: its result is a CursorResult (Session.execute is typed for any
    statement, as a plain Result)."""
    assert isinstance(result, CursorResult)
    return result.rowcount


class QueueFull(Exception):
    """More edits would be waiting than MAX_QUEUE allows."""

    def __init__(self, depth: int):
        super().__init__(f"{depth} edits are waiting")
        self.depth = depth


def db_now(session: Session) -> float:
    """The database's clock in Unix seconds: every process compares lease times on one clock."""
    if session.get_bind().dialect.name == "postgresql":
        return float(session.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
    return float(session.scalar(text("SELECT (julianday('now') - 2440587.5) * 86400.0")))


def _lock_log(session: Session) -> None:
    """Serialises inserts of edits and restores until commit. On PostgreSQL ids come from a
    sequence and could otherwise commit out of order (a restore would then miss an edit with a
    smaller id); SQLite serialises writers itself."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOG_LOCK_KEY})


# ----- edits -----
def add_edits(
    session: Session,
    items: list[dict[str, Any]],
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
    max_queue: int | None = None,
) -> list[Edit]:
    """Adds queued edits; QueueFull if more than `max_queue` would then be waiting."""
    _lock_log(session)
    if max_queue is not None:
        depth = queue_depth(session)
        if depth + len(items) > max_queue:
            session.rollback()
            raise QueueFull(depth)
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


def queue_depth(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Edit).where(Edit.status.in_(PENDING))) or 0


def oldest_pending(session: Session) -> datetime | None:
    return session.scalar(select(func.min(Edit.created_at)).where(Edit.status.in_(PENDING)))


def edits_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Edit.status, func.count()).group_by(Edit.status))
    return {status: count for status, count in rows}


def applied_since(session: Session, since: datetime) -> int:
    query = select(func.count()).select_from(Edit).where(Edit.status == "applied", Edit.finished_at >= since)
    return session.scalar(query) or 0


def version_edit_ids(session: Session, version_id: int) -> list[int]:
    return list(session.scalars(select(Edit.id).where(Edit.version_id == version_id).order_by(Edit.id)))


# ----- the trainer's work, in log order -----
def next_work(session: Session, limit: int) -> tuple[list[Edit], Restore | None]:
    """What comes next: queued edits accepted before the first queued restore (in id order), or
    that restore once every edit before it is final."""
    restore = first_queued_restore(session)
    query = select(Edit).where(Edit.status == "queued")
    if restore is not None:
        query = query.where(Edit.id <= restore.after_edit_id)
    edits = list(session.scalars(query.order_by(Edit.id).limit(limit)))
    if edits or restore is None:
        return edits, None
    unfinished = select(func.count()).select_from(Edit).where(
        Edit.status.in_(PENDING), Edit.id <= restore.after_edit_id
    )
    return [], restore if not session.scalar(unfinished) else None


def first_queued_restore(session: Session) -> Restore | None:
    return session.scalars(select(Restore).where(Restore.status == "queued").order_by(Restore.id).limit(1)).first()


def claim_edits(session: Session, edit_ids: list[int], epoch: int) -> list[Edit]:
    """Marks the edits `applying` for this lease epoch, all or none: only rows still queued, and
    only while the epoch holds the lease (the chain row's lock orders this against a takeover)."""
    if not holds_lease(session, epoch, lock=True):
        session.rollback()
        return []
    result = session.execute(
        update(Edit)
        .where(Edit.id.in_(edit_ids), Edit.status == "queued")
        .values(status="applying", claim_epoch=epoch, attempts=Edit.attempts + 1, started_at=utcnow())
    )
    if _rowcount(result) != len(edit_ids):
        session.rollback()
        return []
    session.commit()
    return list(session.scalars(select(Edit).where(Edit.id.in_(edit_ids)).order_by(Edit.id)))


def finish_claimed(session: Session, edit_id: int, epoch: int, **values: Any) -> bool:
    """Sets a claimed edit's final state (not committed); False if this epoch no longer holds it."""
    result = session.execute(
        update(Edit)
        .where(Edit.id == edit_id, Edit.status == "applying", Edit.claim_epoch == epoch)
        .values(finished_at=utcnow(), **values)
    )
    return _rowcount(result) == 1


def requeue_claims(session: Session, epoch: int) -> int:
    """This epoch's edits left `applying` (its step failed, or it stops) back to queued."""
    result = session.execute(
        update(Edit).where(Edit.status == "applying", Edit.claim_epoch == epoch).values(status="queued")
    )
    session.commit()
    return _rowcount(result)


# ----- the trainer lease -----
def get_chain(session: Session) -> Chain:
    chain = session.get(Chain, CHAIN_ID)
    assert chain is not None  # the migrations make the chain row
    return chain


def acquire_lease(session: Session, worker: str, ttl: float) -> int | None:
    """Takes the trainer lease if nobody holds it or its holder stopped renewing it; returns the
    new epoch. Edits the previous holder left `applying` go back to the queue in the same
    transaction."""
    now = db_now(session)
    result = session.execute(
        update(Chain)
        .where(Chain.id == CHAIN_ID, (Chain.trainer.is_(None)) | (Chain.lease_expires < now))
        .values(trainer=worker, epoch=Chain.epoch + 1, lease_expires=now + ttl, heartbeat=now)
    )
    if _rowcount(result) != 1:
        session.rollback()
        return None
    epoch = session.scalar(select(Chain.epoch).where(Chain.id == CHAIN_ID))
    session.execute(update(Edit).where(Edit.status == "applying").values(status="queued"))
    session.commit()
    return epoch


def renew_lease(session: Session, epoch: int, ttl: float) -> bool:
    """Extends the lease of `epoch`; False once another worker took it over."""
    now = db_now(session)
    result = session.execute(
        update(Chain).where(Chain.id == CHAIN_ID, Chain.epoch == epoch).values(lease_expires=now + ttl, heartbeat=now)
    )
    session.commit()
    return _rowcount(result) == 1


def release_lease(session: Session, epoch: int) -> None:
    """Lets a standby take over at once (on a clean shutdown)."""
    session.execute(update(Chain).where(Chain.id == CHAIN_ID, Chain.epoch == epoch).values(trainer=None, lease_expires=0.0))
    session.commit()


def holds_lease(session: Session, epoch: int, lock: bool = False) -> bool:
    query = select(Chain.id).where(Chain.id == CHAIN_ID, Chain.epoch == epoch, Chain.trainer.is_not(None))
    return session.scalar(query.with_for_update() if lock else query) is not None


# ----- versions and checkpoints -----
def head_id(session: Session) -> int | None:
    return session.scalar(select(Chain.head_version_id).where(Chain.id == CHAIN_ID))


def current_version(session: Session) -> Version | None:
    head = head_id(session)
    return None if head is None else session.get(Version, head)


def get_version(session: Session, version_id: int) -> Version | None:
    return session.get(Version, version_id)


def list_versions(session: Session, limit: int, offset: int) -> tuple[list[Version], int]:
    items = list(session.scalars(select(Version).order_by(Version.id).limit(limit).offset(offset)))
    return items, session.scalar(select(func.count()).select_from(Version)) or 0


def count_versions(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Version)) or 0


def state_versions(session: Session, version_id: int) -> set[int]:
    """The versions whose own edits are in `version_id`'s adapter state: an edit or batch version
    adds its edits to its parent's, a restore has exactly the state it restored."""
    rows = {v.id: v for v in session.execute(select(Version.id, Version.kind, Version.parent_id, Version.restored_from_id))}
    found: set[int] = set()
    current: int | None = version_id
    while current is not None and current in rows:
        row = rows[current]
        if row.kind == "restore":
            current = row.restored_from_id
            continue
        if row.kind != "base":
            found.add(current)
        current = row.parent_id
    return found


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


def advance_head(session: Session, epoch: int, parent_id: int, version_id: int) -> bool:
    """Moves the head from `parent_id` to the new version (not committed), only if the parent is
    still the head and `epoch` still holds the lease; the caller rolls back on False."""
    result = session.execute(
        update(Chain)
        .where(Chain.id == CHAIN_ID, Chain.head_version_id == parent_id, Chain.epoch == epoch)
        .values(head_version_id=version_id)
    )
    return _rowcount(result) == 1


def ensure_base_version(sessions: sessionmaker[Session], save_base) -> Version:
    """The unedited model as the first version and head. `save_base()` writes its checkpoint and
    returns (sha256, path, size); called only when there is no version yet."""
    with sessions() as session:
        base = session.scalars(select(Version).where(Version.is_base.is_(True))).first()
        if base is not None:
            return base
        sha256, path, size = save_base()
        ensure_checkpoint(session, sha256, path, size)
        try:
            base = new_version(session, "base", sha256, 0, None)
            session.execute(
                update(Chain).where(Chain.id == CHAIN_ID, Chain.head_version_id.is_(None)).values(head_version_id=base.id)
            )
            session.commit()
        except IntegrityError:  # the other process created it first
            session.rollback()
            base = session.scalars(select(Version).where(Version.is_base.is_(True))).one()
        return base


def put_blob(session: Session, sha256: str, data: bytes) -> None:
    """Stores a checkpoint file unless present (committed at once: content-addressed, so a blob
    nobody points at yet is harmless)."""
    if has_blob(session, sha256):
        return
    session.add(Blob(sha256=sha256, data=data))
    try:
        session.commit()
    except IntegrityError:  # another process stored the same bytes
        session.rollback()


def has_blob(session: Session, sha256: str) -> bool:
    return session.scalar(select(Blob.sha256).where(Blob.sha256 == sha256)) is not None


def get_blob(session: Session, sha256: str) -> bytes | None:
    return session.scalar(select(Blob.data).where(Blob.sha256 == sha256))


# ----- restores -----
def add_restore(session: Session, target_version_id: int) -> Restore:
    """Queues a restore after every edit accepted so far."""
    _lock_log(session)
    restore = Restore(target_version_id=target_version_id, status="queued")
    session.add(restore)
    session.flush()  # on SQLite this takes the write lock: no edit commits between here and commit
    restore.after_edit_id = session.scalar(select(func.max(Edit.id))) or 0
    session.commit()
    return restore


def finish_restore(session: Session, restore_id: int, **values: Any) -> bool:
    """Sets a queued restore's outcome (not committed); False if it is no longer queued."""
    result = session.execute(
        update(Restore).where(Restore.id == restore_id, Restore.status == "queued").values(finished_at=utcnow(), **values)
    )
    return _rowcount(result) == 1


def get_restore(session: Session, restore_id: int) -> Restore | None:
    return session.get(Restore, restore_id)
