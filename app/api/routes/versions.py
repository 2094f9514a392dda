"""GET /versions, GET /versions/{v}, POST /versions/{v}/restore, GET /restores/{r}."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError

from ... import crud
from ...models import Restore
from ...schemas import MAX_ID, ErrorOut, RestoreIn, RestoreOut, RestoreStatus, VersionOut, VersionPage
from ...service import Service
from ..deps import DbService, require_json, require_read, require_write

log = logging.getLogger(__name__)
router = APIRouter(prefix="/versions", tags=["versions"])
restores = APIRouter(prefix="/restores", tags=["versions"])
VersionId = Annotated[int, Path(ge=1, le=MAX_ID)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 415, 422, 503)}


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
    dependencies=[Depends(require_write), Depends(require_json)],
    responses={202: {"model": RestoreOut, "description": "queued; the worker has not done it yet"}, **ERRORS},
)
async def restore_version(service: DbService, version_id: VersionId, body: RestoreIn):
    """Queued after every edit accepted before it: the worker swaps that version's adapter in (no
    restart, no model reload) and records the restore as a new version. Waits up to
    RESTORE_WAIT_S for it (without holding a server thread); then 202, to follow at
    GET /restores/{id}. The body is `{}`: JSON, so that no other site can send it."""
    restore = await run_in_threadpool(_add_restore, service, version_id)
    await run_in_threadpool(service.notify, f"restore {restore.id}")  # Redis I/O: off the event loop
    deadline = time.monotonic() + service.settings.restore_wait_s
    while restore.status == "queued" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        try:
            current = await run_in_threadpool(_get_restore, service, restore.id)
        except DBAPIError as err:
            # The restore is accepted (committed): a 503 now would have the client send it again.
            log.warning("restore %d accepted; its status cannot be read (%s)", restore.id, err)
            break
        assert current is not None  # restore rows are never deleted
        restore = current
    return _restore_answer(restore)


@restores.get("/{restore_id}", response_model=RestoreOut, dependencies=[Depends(require_read)], responses=ERRORS)
def get_restore(service: DbService, restore_id: Annotated[int, Path(ge=1, le=MAX_ID)]):
    restore = _get_restore(service, restore_id)
    if restore is None:
        raise HTTPException(404, f"restore {restore_id} does not exist")
    return _restore_answer(restore)


def _add_restore(service: Service, version_id: int) -> Restore:
    with service.runtime.session() as session:
        if crud.get_version(session, version_id) is None:
            raise HTTPException(404, f"version {version_id} does not exist")
        return crud.add_restore(session, version_id)


def _get_restore(service: Service, restore_id: int) -> Restore | None:
    with service.runtime.session() as session:
        return crud.get_restore(session, restore_id)


def _restore_answer(restore: Restore) -> JSONResponse:
    if restore.status == "failed":
        raise HTTPException(409, f"restore of version {restore.target_version_id} failed: {restore.error}")
    out = RestoreOut(
        restore_id=restore.id,
        status=cast(RestoreStatus, restore.status),  # a row's status is one of these (and is validated)
        version=restore.version_id,
        restored_from=restore.target_version_id,
        error=restore.error,
    )
    return JSONResponse(out.model_dump(), status_code=200 if restore.status == "done" else 202)
