"""Shared dependencies: the service, readiness gates, and API-key access classes. They neither block
nor wait, so they are `async`: FastAPI runs a plain `def` dependency in its thread pool, a hop
there and back through the event loop for each, which under streaming load held a request up
before its route began (docs/serving.md)."""
from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..runtime import Runtime
from ..service import Service

bearer = HTTPBearer(auto_error=False, description="API key: a full key, or a read-only key for reads and generation")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def database_ready(service: ServiceDep) -> Service:
    if not service.migrated.is_set():
        raise HTTPException(503, service.runtime.load_error or "the database is not migrated yet")
    return service


async def model_ready(service: ServiceDep) -> Runtime:
    runtime = service.runtime
    if not runtime.ready.is_set():
        raise HTTPException(503, runtime.load_error or "the model is still loading")
    return runtime


DbService = Annotated[Service, Depends(database_ready)]
ReadyRuntime = Annotated[Runtime, Depends(model_ready)]


async def require_json(request: Request) -> None:
    """State-changing requests must say Content-Type: application/json. A page on another site
    can POST text/plain, a form, or a body without a type, but not JSON without a CORS preflight
    (which this service does not answer): no cross-site edit or restore."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(415, "send the body as JSON with Content-Type: application/json")


def _matches(key: str, keys: set[str]) -> bool:
    return any(secrets.compare_digest(key.encode(), k.encode()) for k in keys)


def _check(service: Service, credentials: HTTPAuthorizationCredentials | None, write: bool) -> None:
    settings = service.settings
    write_keys, read_keys = settings.write_keys, settings.read_keys
    if not write_keys and not read_keys:
        return  # no keys: open (python -m app serves so only on loopback, unless ALLOW_UNAUTHENTICATED)
    if credentials is None:
        raise HTTPException(401, "missing Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"})
    key = credentials.credentials
    if _matches(key, write_keys):
        return
    if _matches(key, read_keys):
        if write:
            raise HTTPException(403, "this key is read-only")
        return
    raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})


async def require_read(service: ServiceDep, credentials: Credentials) -> None:
    _check(service, credentials, write=False)


async def require_write(service: ServiceDep, credentials: Credentials) -> None:
    _check(service, credentials, write=True)
