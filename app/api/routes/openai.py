"""The OpenAI-compatible API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
whole or streamed as OpenAI's server-sent events, errors in OpenAI's shape.

Model names: NAME (the base model, unedited: the base version), NAME@current (whatever version
is current when the request arrives) and NAME@<version> for every version. A version's name
never changes meaning (versions are immutable; a restore makes a new one), and responses name
the version that answered, so that a client always knows which adapter it got."""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from baft_core.checkpoint import CheckpointError

from ...models import Version
from ...runtime import Generation, InvalidRequest, NotFound, Runtime
from ...schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionIn,
    ChatCompletionOut,
    CompletionChoice,
    CompletionIn,
    CompletionOut,
    ModelCard,
    ModelList,
    OpenAIError,
    Usage,
)
from ..deps import ReadyRuntime, require_read

log = logging.getLogger(__name__)
CURRENT = "current"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    503: "service_unavailable_error",
}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class ModelNotFound(LookupError):
    """A model name that names no version."""


class OpenAIRoute(APIRoute):
    """Errors of /v1 in OpenAI's shape ({"error": {message, type, param, code}}), invalid input
    as 400 as OpenAI answers it, so that OpenAI clients raise their usual exceptions."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = [str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p)]
                param = ".".join(where) or None
                message = f"invalid {param}: {first.get('msg', 'invalid')}" if param else "invalid request body"
                return openai_error(400, message, param)
            except HTTPException as exc:
                response = openai_error(exc.status_code, str(exc.detail))
                response.headers.update(getattr(exc, "headers", None) or {})
                return response
            except ModelNotFound as exc:
                return openai_error(404, str(exc), "model", "model_not_found")
            except NotFound as exc:
                return openai_error(404, str(exc))
            except InvalidRequest as exc:  # the request's own checks; other errors are 500s
                code = "context_length_exceeded" if "context" in str(exc) else None
                return openai_error(400, str(exc), code=code)
            except CheckpointError as exc:
                return openai_error(409, f"checkpoint unusable: {exc}")
            except DBAPIError as exc:
                return openai_error(503, f"database unavailable: {type(exc.orig).__name__}")
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return openai_error(500, "internal error (logged on the server)")

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(require_read)])
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": OpenAIError} for code in (400, 401, 403, 404, 409, 503)}


# ----- model names -----
def _versions(runtime: Runtime) -> list[Version]:
    with runtime.session() as session:
        return list(session.scalars(select(Version).order_by(Version.id)))


def _card(runtime: Runtime, name: str, version: Version | None, created) -> ModelCard:
    return ModelCard(id=name, created=int(created.timestamp()), owned_by="baft", version=None if version is None else version.id)


def resolve(runtime: Runtime, model: str) -> int | None:
    """The version a model name stands for (None: the current one)."""
    base, _, suffix = model.partition("@")
    if base != runtime.model_name:
        raise ModelNotFound(f"the model {model!r} does not exist: see GET /v1/models (base name {runtime.model_name!r})")
    if not suffix:
        with runtime.session() as session:
            version = session.scalars(select(Version).where(Version.kind == "base").order_by(Version.id)).first()
        if version is None:
            raise ModelNotFound("the base version does not exist yet")
        return version.id
    if suffix == CURRENT:
        return None
    if not suffix.isdigit() or not 0 < int(suffix) < 2**31:
        raise ModelNotFound(f"the model {model!r} does not exist: after '@' comes 'current' or a version number")
    with runtime.session() as session:
        if session.get(Version, int(suffix)) is None:
            raise ModelNotFound(f"the model {model!r} does not exist: no version {suffix}")
    return int(suffix)


def version_name(runtime: Runtime, version: int) -> str:
    return f"{runtime.model_name}@{version}"


@router.get("/models", response_model=ModelList, responses=ERRORS)
def list_models(runtime: ReadyRuntime):
    versions = _versions(runtime)
    base = next(v for v in versions if v.kind == "base")
    cards = [_card(runtime, runtime.model_name, base, base.created_at),
             ModelCard(id=f"{runtime.model_name}@{CURRENT}", created=int(versions[-1].created_at.timestamp()),
                       owned_by="baft")]
    cards += [_card(runtime, version_name(runtime, v.id), v, v.created_at) for v in versions]
    return ModelList(data=cards)


@router.get("/models/{model}", response_model=ModelCard, responses=ERRORS)
def get_model(model: str, runtime: ReadyRuntime):
    version_id = resolve(runtime, model)
    versions = _versions(runtime)
    version = versions[-1] if version_id is None else next(v for v in versions if v.id == version_id)
    return _card(runtime, model, None if version_id is None else version, version.created_at)


# ----- generation -----
def _limit(runtime: Runtime, requested: int | None, prompt_tokens: int) -> int:
    """max_tokens checked against the server's limit; without one, as much as the context and
    the server's limit allow."""
    server = runtime.settings.max_new_tokens
    if requested is None:
        return max(1, min(server, runtime.loaded_reader.context - prompt_tokens))
    if requested > server:
        raise InvalidRequest(f"max_tokens {requested} exceeds this server's limit of {server}")
    return requested


def until_stop(generation: Generation, stops: list[str]) -> Iterator[str]:
    """The generation's text up to the first stop sequence (excluded), which ends it (its row is
    cancelled) with finish_reason "stop". Text that may be the start of a stop sequence is held
    back until it is known not to be one."""
    if not stops:
        yield from generation.pieces
        return
    held = ""
    for piece in generation.pieces:
        held += piece
        cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut:
                yield held[:cut]
            generation.pieces.close()
            generation.finish_reason = "stop"
            return
        keep = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        if len(held) > keep:
            yield held[: len(held) - keep]
            held = held[len(held) - keep :]
    if held:
        yield held


def _usage(generation: Generation) -> Usage:
    completion = len(generation.token_ids)
    return Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=completion,
                 total_tokens=generation.prompt_tokens + completion)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _start(runtime: Runtime, ids: list[int], body, max_tokens: int | None) -> Generation:
    return runtime.stream(
        ids,
        _limit(runtime, max_tokens, len(ids)),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        version_id=resolve(runtime, body.model),
    )


@router.post(
    "/completions",
    response_model=CompletionOut,
    responses={200: {"content": {"text/event-stream": {"description": "with stream: true"}}}, **ERRORS},
)
def completions(body: CompletionIn, runtime: ReadyRuntime):
    if body.stream and len(body.prompts) > 1:
        raise InvalidRequest("stream takes a single prompt")
    generations = [_start(runtime, runtime.prompt_ids(p), body, body.max_tokens) for p in body.prompts]
    created, name = int(time.time()), version_name(runtime, generations[0].version)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        return _stream_completion(generations[0], body, completion_id, created, name)
    # Every prompt's row is started before any is read to the end: they decode in one batch.
    streams = [until_stop(g, body.stops) for g in generations]
    firsts = [next(stream, "") for stream in streams]
    texts = [first + "".join(stream) for first, stream in zip(firsts, streams)]
    return CompletionOut(
        id=completion_id,
        created=created,
        model=name,
        choices=[CompletionChoice(index=i, text=t, finish_reason=g.finish_reason) for i, (t, g) in enumerate(zip(texts, generations))],
        usage=Usage(
            prompt_tokens=sum(g.prompt_tokens for g in generations),
            completion_tokens=sum(len(g.token_ids) for g in generations),
            total_tokens=sum(g.prompt_tokens + len(g.token_ids) for g in generations),
        ),
    )


def _stream_completion(generation: Generation, body: CompletionIn, completion_id: str, created: int, name: str):
    head = {"id": completion_id, "object": "text_completion", "created": created, "model": name}

    def events() -> Iterator[str]:
        for piece in until_stop(generation, body.stops):
            yield _event({**head, "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]})
        yield _event({**head, "choices": [{"index": 0, "text": "", "finish_reason": generation.finish_reason, "logprobs": None}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _event({**head, "choices": [], "usage": _usage(generation).model_dump()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post(
    "/chat/completions",
    response_model=ChatCompletionOut,
    responses={200: {"content": {"text/event-stream": {"description": "with stream: true"}}}, **ERRORS},
)
def chat_completions(body: ChatCompletionIn, runtime: ReadyRuntime):
    ids = runtime.chat_ids([m.as_template_message() for m in body.messages])
    generation = _start(runtime, ids, body, body.token_limit)
    created, name = int(time.time()), version_name(runtime, generation.version)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if not body.stream:
        text = "".join(until_stop(generation, body.stops))
        assert generation.finish_reason is not None  # set once its text is read to the end
        return ChatCompletionOut(
            id=completion_id,
            created=created,
            model=name,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=generation.finish_reason)],
            usage=_usage(generation),
        )
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name}

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return _event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

    def events() -> Iterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        for piece in until_stop(generation, body.stops):
            yield chunk({"content": piece})
        yield chunk({}, generation.finish_reason)
        if body.stream_options and body.stream_options.include_usage:
            yield _event({**head, "choices": [], "usage": _usage(generation).model_dump()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
