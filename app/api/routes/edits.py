"""POST /edits, GET /edits, GET /edits/{id}, GET /edits/{id}/metrics."""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, Query
from sqlalchemy.exc import IntegrityError

from ... import crud
from ...schemas import (
    MAX_ID,
    EditAccepted,
    EditBatchIn,
    EditIn,
    EditOut,
    EditPage,
    EditsAccepted,
    ErrorOut,
    MetricsOut,
    Status,
)
from ..deps import DbService, ReadyRuntime, require_json, require_read, require_write

router = APIRouter(prefix="/edits", tags=["edits"])
EditId = Annotated[int, Path(ge=1, le=MAX_ID)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 415, 422, 429, 503)}


def _accepted(edits, single: bool) -> EditAccepted | EditsAccepted:
    items = [EditAccepted(id=e.id, status=e.status) for e in edits]
    return items[0] if single else EditsAccepted(edits=items)


@router.post(
    "",
    status_code=202,
    response_model=EditAccepted | EditsAccepted,
    dependencies=[Depends(require_write), Depends(require_json)],
    responses=ERRORS,
    summary="Accept one edit, or a list of edits, for the worker to apply (429 while MAX_QUEUE wait)",
)
def create_edits(
    service: DbService,
    body: Annotated[EditIn | EditBatchIn, Body()],
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
):
    if isinstance(body, EditIn):
        single, items = True, [body]
    else:
        single, items = False, list(body)
    fingerprint = hashlib.sha256(
        json.dumps([i.model_dump() for i in items], sort_keys=True).encode()
    ).hexdigest()
    with service.runtime.session() as session:
        if idempotency_key:
            existing = crud.edits_by_key(session, idempotency_key)
            if existing:
                return _replay(existing, fingerprint, single)
        service.check_tokens(items)
        rows = [
            dict(
                mode=item.mode,
                subject=item.subject,
                relation=item.relation,
                object=item.object,
                request=item.to_request().to_dict(),
            )
            for item in items
        ]
        try:
            edits = crud.add_edits(session, rows, idempotency_key, fingerprint, service.settings.max_queue)
        except IntegrityError:  # a concurrent request with the same key won
            assert idempotency_key is not None  # only keyed rows can conflict
            session.rollback()
            return _replay(crud.edits_by_key(session, idempotency_key), fingerprint, single)
        except crud.QueueFull as full:
            retry = service.retry_after(full.depth, len(rows))
            raise HTTPException(
                429,
                f"{full.depth} edits are waiting (the limit is {service.settings.max_queue}); retry in {retry} s",
                headers={"Retry-After": str(retry)},
            ) from None
    service.notify(f"edits {edits[0].id}-{edits[-1].id}")
    return _accepted(edits, single)


def _replay(existing, fingerprint: str, single: bool):
    if existing[0].fingerprint != fingerprint:
        raise HTTPException(409, "this Idempotency-Key was used with a different request body")
    return _accepted(existing, single)


@router.get("", response_model=EditPage, dependencies=[Depends(require_read)], responses=ERRORS)
def list_edits(
    service: DbService,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
):
    with service.runtime.session() as session:
        rows, total = crud.list_edits(session, status, limit, offset)
        current = service.in_current_version(session)
        return EditPage(items=[EditOut.from_row(r, current) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{edit_id}", response_model=EditOut, dependencies=[Depends(require_read)], responses=ERRORS)
def get_edit(service: DbService, edit_id: EditId):
    with service.runtime.session() as session:
        row = crud.get_edit(session, edit_id)
        if row is None:
            raise HTTPException(404, f"edit {edit_id} does not exist")
        return EditOut.from_row(row, service.in_current_version(session))


@router.get(
    "/{edit_id}/metrics", response_model=MetricsOut, dependencies=[Depends(require_read)], responses=ERRORS
)
def edit_metrics(
    runtime: ReadyRuntime,
    edit_id: EditId,
    version: Annotated[
        str | None,
        Query(
            pattern=r"^(current|[1-9][0-9]{0,8})$",
            description="re-measure on `current` or on a version id (default: as measured when applied)",
        ),
    ] = None,
):
    with runtime.session() as session:
        row = crud.get_edit(session, edit_id)
    if row is None:
        raise HTTPException(404, f"edit {edit_id} does not exist")
    if row.status != "applied":
        reason = f"edit {edit_id} is {row.status}" + (f" ({row.error})" if row.error else "")
        raise HTTPException(409, reason + "; metrics exist once it is applied")
    assert row.version_id is not None  # an applied edit is in a version
    if version is None and row.metrics is not None:
        return MetricsOut.build(row, row.version_id, "at_apply", row.metrics)
    target = row.version_id if version is None else None if version == "current" else int(version)
    measured_on, values = runtime.measure(row.request, target)
    return MetricsOut.build(row, measured_on, "remeasured", values)
