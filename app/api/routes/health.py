"""GET /health (the process is up) and GET /ready (model, database and queue all usable)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ...db import ping
from ...schemas import Health, Readiness
from ..deps import ServiceDep

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
    except Exception as err:  # any driver error means: not reachable
        checks["database"] = f"unreachable: {type(err).__name__}"
    if service.queue is not None:
        checks["queue"] = "ok" if service.queue.ping() else "redis unreachable"
    else:
        checks["queue"] = "ok" if service.worker_alive() else "in-process worker not running"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(Readiness(ready=ok, checks=checks).model_dump(), status_code=200 if ok else 503)
