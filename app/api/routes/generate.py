"""POST /generate: text from the current or an older version, whole or as server-sent events."""
from __future__ import annotations

import json
import time
from typing import TypedDict

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from ...runtime import InvalidRequest
from ...schemas import ErrorOut, GenerateIn, GenerateOut
from ..deps import ReadyRuntime, require_read

router = APIRouter(tags=["generate"])


class _Options(TypedDict):
    """`Runtime.stream`'s options, as the body gives them."""

    temperature: float
    top_p: float
    seed: int | None
    version_id: int | None


@router.post(
    "/generate",
    response_model=GenerateOut,
    dependencies=[Depends(require_read)],
    responses={
        200: {"content": {"text/event-stream": {"description": "with stream: true"}}},
        **{code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 422, 503)},
    },
)
def generate(body: GenerateIn, runtime: ReadyRuntime):
    limit = runtime.settings.max_new_tokens
    if body.max_new_tokens > limit:
        raise InvalidRequest(f"max_new_tokens {body.max_new_tokens} exceeds this server's limit of {limit}")
    options = _Options(temperature=body.temperature, top_p=body.top_p, seed=body.seed, version_id=body.version)
    if not body.stream:
        return runtime.generate(body.prompt, body.max_new_tokens, **options)
    began = time.perf_counter()
    generation = runtime.stream(runtime.prompt_ids(body.prompt), body.max_new_tokens, **options)

    def events():
        for piece in generation.pieces:
            yield f"data: {json.dumps({'token': piece})}\n\n"
        runtime.metrics.observe_generation(len(generation.token_ids), time.perf_counter() - began)
        done = {"version": generation.version, "tokens": len(generation.token_ids)}
        yield f"event: done\ndata: {json.dumps(done)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Version": str(generation.version)})
