"""Request and response bodies (pydantic v2): the API contract, with its input limits."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, overload

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from baft_core import EditRequest
from baft_core.subject_probes import SUBJECT_PROBE_GROUP

MAX_TEXT = 1000  # characters of a subject, relation, object or probe
MAX_PROMPT = 8000  # characters of a generation prompt (the token limit is checked too)
MAX_ID = 2**31 - 1  # ids are 32-bit in the database
Status = Literal["queued", "applying", "applied", "failed"]
Mode = Literal["continual", "batched"]
RestoreStatus = Literal["queued", "done", "failed"]


def _clean(value: str) -> str:
    if not any(ch.isprintable() and not ch.isspace() for ch in value):
        raise ValueError("must not be blank (it needs a visible character)")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT), AfterValidator(_clean)]
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT), AfterValidator(_clean)]


class ProbeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text
    answer: Text


class EditIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"subject": "Danielle Darrieux", "relation": "The mother tongue of {subject} is", "object": "English"}]
        },
    )
    subject: Text
    relation: Text = Field(description='A template with {subject}, or a phrase that follows the subject ("was born in")')
    object: Text
    rephrases: list[Text] = Field(default_factory=list, max_length=16)
    locality: list[ProbeIn] = Field(
        default_factory=list,
        max_length=16,
        description="prompts whose answers must not change, each with the answer the model gives now: "
        "those about the edit's subject are projected out of its block and its relation check keeps it "
        "shut on them (with sealed_gates, its gates also learn to stay closed on them), and all are measured",
    )
    portability: list[ProbeIn] = Field(default_factory=list, max_length=16)
    mode: Mode = "continual"

    @model_validator(mode="after")
    def _check_template(self) -> EditIn:
        # Only the {subject} field is allowed: anything else in braces is a template error (and a
        # format spec like {subject:>99999999} could allocate gigabytes).
        if "{" in self.relation.replace("{subject}", "") or "}" in self.relation.replace("{subject}", ""):
            raise ValueError("bad relation template: the only placeholder allowed is {subject}")
        self.to_request()  # baft_core's own checks
        return self

    def to_request(self) -> EditRequest:
        return EditRequest.from_triple(
            self.subject,
            self.relation,
            self.object,
            rephrases=list(self.rephrases),
            locality=[p.model_dump() for p in self.locality],
            portability=[p.model_dump() for p in self.portability],
        )


EditBatchIn = Annotated[list[EditIn], Field(min_length=1, max_length=100)]


@overload
def _utc(value: datetime) -> datetime: ...
@overload
def _utc(value: None) -> None: ...
def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; they are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class EditAccepted(BaseModel):
    id: int
    status: Status


class EditsAccepted(BaseModel):
    edits: list[EditAccepted]


class EditOut(BaseModel):
    id: int
    status: Status
    mode: Mode
    subject: str
    relation: str
    object: str
    prompt: str
    error: str | None = Field(None, description="why the edit failed")
    version: int | None = Field(None, description="the version that applied this edit")
    in_current_version: bool = Field(
        description="the current version holds this edit (false once a restore went back before it)"
    )
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_seconds: float | None = Field(None, description="time from acceptance to training start")
    train_seconds: float | None

    @classmethod
    def from_row(cls, row, current: set[int]) -> EditOut:
        """`current`: the versions whose edits the current version holds."""
        created, started, finished = _utc(row.created_at), _utc(row.started_at), _utc(row.finished_at)
        return cls(
            id=row.id,
            status=row.status,
            mode=row.mode,
            subject=row.subject,
            relation=row.relation,
            object=row.object,
            prompt=row.request["prompt"],
            error=row.error,
            version=row.version_id,
            in_current_version=row.status == "applied" and row.version_id in current,
            attempts=row.attempts,
            created_at=created,
            started_at=started,
            finished_at=finished,
            queue_seconds=(started - created).total_seconds() if started else None,
            train_seconds=row.train_seconds,
        )


class EditPage(BaseModel):
    items: list[EditOut]
    total: int
    limit: int
    offset: int


class MetricsOut(BaseModel):
    edit_id: int
    version: int = Field(description="the version measured")
    measured: Literal["at_apply", "remeasured"]
    reliability: float | None
    generality: float | None
    locality: float | None = Field(description="the request's locality probes and the subject probes together")
    subject_locality: float | None = Field(
        None,
        description="other relations of the edit's subject that the service asked the model about "
        "(its built-in list): the share of answer tokens unchanged from the unedited model. The relation "
        "check holds prompts against these very probes, so this says that it acts, not how it carries to "
        "other wordings",
    )
    portability: float | None
    reliability_em: float | None = Field(description="greedy generation reproduces the object")
    generality_em: float | None
    answer_repeated: float | None = Field(
        None, description="the object comes again in the 16 greedy tokens after it (lower is better)"
    )
    steps: int | None
    loss: float | None
    train_seconds: float | None
    basis_weights: dict[str, list[float]] | None = Field(description="mean basis weights w_k per layer")

    @classmethod
    def build(cls, row, version: int, measured: Literal["at_apply", "remeasured"], values: dict[str, Any] | None) -> MetricsOut:
        values = values or {}
        return cls(
            edit_id=row.id,
            version=version,
            measured=measured,
            reliability=values.get("rel"),
            generality=values.get("gen"),
            locality=values.get("loc"),
            subject_locality=values.get(f"loc/{SUBJECT_PROBE_GROUP}"),
            portability=values.get("por"),
            reliability_em=values.get("rel_em"),
            generality_em=values.get("gen_em"),
            answer_repeated=values.get("rep"),
            steps=row.steps,
            loss=row.loss,
            train_seconds=row.train_seconds,
            basis_weights=row.basis_weights,
        )


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Prompt
    max_new_tokens: int = Field(32, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="for reproducible sampling")
    version: int | None = Field(None, ge=1, le=MAX_ID, description="generate from this version (default: current)")
    stream: bool = Field(False, description="stream tokens as server-sent events")

    @model_validator(mode="after")
    def _check_temperature(self) -> GenerateIn:
        # Below this, logits / temperature overflow and sampling breaks down; 0 means greedy.
        if 0 < self.temperature < 0.01:
            raise ValueError("temperature must be 0 (greedy) or at least 0.01")
        return self


class GenerateOut(BaseModel):
    text: str
    version: int = Field(description="the version that produced the text")
    tokens: int
    seconds: float


class VersionOut(BaseModel):
    id: int
    parent: int | None
    kind: Literal["base", "edit", "batch", "restore"]
    restored_from: int | None
    edits: list[int] = Field(description="edits this version added")
    edit_count: int = Field(description="edits in this version's state")
    checkpoint_sha256: str
    created_at: datetime

    @classmethod
    def from_row(cls, row, edits: list[int]) -> VersionOut:
        return cls(
            id=row.id,
            parent=row.parent_id,
            kind=row.kind,
            restored_from=row.restored_from_id,
            edits=edits,
            edit_count=row.edit_count,
            checkpoint_sha256=row.checkpoint_sha256,
            created_at=_utc(row.created_at),
        )


class VersionPage(BaseModel):
    items: list[VersionOut]
    total: int
    limit: int
    offset: int


class RestoreIn(BaseModel):
    """A JSON body (may be `{}`): a browser cannot send one cross-site without a CORS preflight."""

    model_config = ConfigDict(extra="forbid")


class RestoreOut(BaseModel):
    restore_id: int
    status: RestoreStatus
    version: int | None = Field(None, description="the new version that records the restore")
    restored_from: int
    error: str | None = None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, str]


class ErrorOut(BaseModel):
    reason: str
    detail: Any = None


# ----- the OpenAI-compatible API (/v1) -----

MAX_STOPS = 4  # stop sequences per request, as OpenAI allows


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    """The fields both /v1 endpoints take. Unsupported OpenAI fields are refused with their name
    rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="the base name (unedited), NAME@current, or NAME@<version> (see GET /v1/models)"
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: Annotated[str, StringConstraints(min_length=1, max_length=200)] | Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=200)]], Field(max_length=MAX_STOPS)
    ] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @model_validator(mode="after")
    def _check_temperature(self) -> _OpenAIRequest:
        if 0 < self.temperature < 0.01:
            raise ValueError("temperature must be 0 (greedy) or at least 0.01")
        return self


class CompletionIn(_OpenAIRequest):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=16)]
    max_tokens: int = Field(16, ge=1, le=1024)
    echo: Literal[False] = False
    logprobs: None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=MAX_PROMPT)] | Annotated[list[TextPart], Field(max_length=32)]
    name: str | None = Field(None, max_length=64)

    def as_template_message(self) -> dict[str, str]:
        """Role and text, as chat templates take them ("developer" is OpenAI's newer "system")."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionIn(_OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=64)]
    max_tokens: int | None = Field(None, ge=1, le=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1024, description="OpenAI's newer name of max_tokens")
    logprobs: Literal[False] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    version: int | None = Field(default=None, description="the version this name stands for (None: follows current)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionOut(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description="the immutable name of the version that answered, NAME@<version>")
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="the immutable name of the version that answered, NAME@<version>")
    choices: list[ChatChoice]
    usage: Usage


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody
