"""GET /versions, GET /versions/{v}, POST /versions/{v}/restore."""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import JSONResponse

from ... import crud
from ...models import Restore
from ...schemas import MAX_ID, ErrorOut, RestoreOut, VersionOut, VersionPage
from ..deps import DbService, require_read, require_write

router = APIRouter(prefix="/versions", tags=["versions"])
VersionId = Annotated[int, Path(ge=1, le=MAX_ID)]
ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 503)}


@router.get("", response_model=VersionPage, dependencies=[Depends(require_read)], responses=ERRORS)
def list_versions(
    service: DbService,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
):
    with service.runtime.session() as session:
        rows, total = crud.list_versions(session, limit, offset)
        items = [VersionOut.from_row(r, crud.version_edit_ids(session, r.id)) for r in rows]
    return VersionPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{version_id}", response_model=VersionOut, dependencies=[Depends(require_read)], responses=ERRORS)
def get_version(service: DbService, version_id: VersionId):
    with service.runtime.session() as session:
        row = crud.get_version(session, version_id)
        if row is None:
            raise HTTPException(404, f"version {version_id} does not exist")
        return VersionOut.from_row(row, crud.version_edit_ids(session, row.id))


@router.post(
    "/{version_id}/restore",
    response_model=RestoreOut,
    dependencies=[Depends(require_write)],
    responses={202: {"model": RestoreOut, "description": "queued; the worker has not done it yet"}, **ERRORS},
)
def restore_version(service: DbService, version_id: VersionId):
    """The worker swaps that version's adapter in (no restart, no model reload) and records the
    restore as a new version; waits up to RESTORE_WAIT_S for it."""
    if service.queue is None and not service.runtime.ready.is_set():
        raise HTTPException(503, service.runtime.load_error or "the worker is still loading the model")
    with service.runtime.session() as session:
        if crud.get_version(session, version_id) is None:
            raise HTTPException(404, f"version {version_id} does not exist")
        restore = crud.add_restore(session, version_id)
    service.notify_restore()
    deadline = time.monotonic() + service.settings.restore_wait_s
    while True:
        with service.runtime.session() as session:
            restore = session.get(Restore, restore.id)
        if restore.status != "queued" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out = RestoreOut(
        restore_id=restore.id,
        status=restore.status,
        version=restore.version_id,
        restored_from=version_id,
        error=restore.error,
    )
    if restore.status == "failed":
        raise HTTPException(409, f"restore of version {version_id} failed: {restore.error}")
    return JSONResponse(out.model_dump(), status_code=200 if restore.status == "done" else 202)
