"""GET /health (the process is up), GET /ready (model, database, queue and a trainer all there)
and GET /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...db import ping
from ...schemas import Health, Readiness
from ..deps import ServiceDep, require_read

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health():
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
def ready(service: ServiceDep):
    runtime = service.runtime
    checks: dict[str, str] = {}
    checks["model"] = "ok" if runtime.ready.is_set() else (runtime.load_error or "loading")
    try:
        ping(runtime.engine)
        checks["database"] = "ok" if service.migrated.is_set() else "not migrated yet"
        checks["worker"] = service.trainer_status() if service.migrated.is_set() else "not migrated yet"
    except Exception as err:  # any driver error means: not reachable
        checks["database"] = f"unreachable: {type(err).__name__}"
        checks["worker"] = "unknown: the database is unreachable"
    if service.doorbell is not None:
        checks["queue"] = "ok" if service.doorbell.ping() else "redis unreachable"
    else:
        checks["queue"] = "ok" if service.worker_alive() else "in-process worker not running"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(Readiness(ready=ok, checks=checks).model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    dependencies=[Depends(require_read)],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
def metrics(service: ServiceDep):
    return Response(generate_latest(service.runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
