"""The FastAPI application: routes, JSON errors with a reason, and the service's lifespan.

Errors: a request the service cannot serve as sent is a 4xx with a reason (422 for invalid input:
pydantic's checks and `InvalidRequest`, which the routes and the runtime raise for what only the
loaded model can check); anything else is a 500 with the traceback in the log."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baft_core.checkpoint import CheckpointError

from .api.routes import edits, generate, health, versions
from .api.routes import openai as openai_routes
from .limits import BodyLimit
from .runtime import InvalidRequest, NotFound, Unavailable
from .service import Service
from .settings import Settings, get_settings

log = logging.getLogger(__name__)


def _error(status: int, reason: str, detail=None, headers=None) -> JSONResponse:
    body = {"reason": reason} if detail is None else {"reason": reason, "detail": detail}
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


def _validation_reason(errors) -> str:
    first = errors[0] if errors else {}
    # Drop pydantic's union/validator tags ("function-after[...]") from the location.
    where = ".".join(str(p) for p in first.get("loc", ()) if "[" not in str(p))
    return f"invalid input at {where}: {first.get('msg', 'invalid')}" if where else "invalid input"


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k != "ctx"} for e in exc.errors()]
        return _error(422, _validation_reason(errors), errors)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound):
        return _error(404, str(exc))

    @app.exception_handler(Unavailable)
    async def unavailable(_: Request, exc: Unavailable):
        return _error(503, str(exc), headers={"Retry-After": "30"})

    @app.exception_handler(CheckpointError)
    async def bad_checkpoint(_: Request, exc: CheckpointError):
        return _error(409, f"checkpoint unusable: {exc}")

    @app.exception_handler(InvalidRequest)
    async def invalid_request(_: Request, exc: InvalidRequest):  # the request's own checks
        return _error(422, str(exc))

    @app.exception_handler(DBAPIError)
    async def database_down(_: Request, exc: DBAPIError):
        return _error(503, f"database unavailable: {type(exc.orig).__name__}")

    @app.exception_handler(redis.RedisError)
    async def queue_down(_: Request, exc: redis.RedisError):
        return _error(503, f"queue unavailable: {exc}")


class CountResponses:
    """Counts responses by status code, and answers an exception that no handler took as a 500
    with a log line (never the client's fault). Plain ASGI: Starlette's `@app.middleware("http")`
    passes every streamed chunk through a stream of its own, event-loop work for each token of
    each generating client."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                service = getattr(scope["app"].state, "service", None)
                if service is not None:
                    service.runtime.metrics.responses.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if started:  # the answer is under way: there is no status left to give
                raise
            await _error(500, "internal error (logged on the server)")(scope, receive, counted)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = Service(settings)
        app.state.service = service
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="BaFT knowledge-editing service",
        version="0.1.0",
        description="Edit facts in a language model with BaFT; versioned adapters with rollback.",
        lifespan=lifespan,
    )
    add_error_handlers(app)
    for module in (health, edits, generate, versions):
        app.include_router(module.router)
    app.include_router(openai_routes.router)
    # The console: static files that call the API above from the browser (no build step).
    app.mount("/console", StaticFiles(directory=Path(__file__).parent / "console", html=True), name="console")
    app.include_router(versions.restores)

    app.add_middleware(CountResponses)
    # Outermost: an oversized body is refused before anything reads it.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
