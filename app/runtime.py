"""What a service process holds: the database, the base model with its editors, the checkpoint
store and the decoding scheduler. The API process generates (batched across requests, see
scheduler.py) and measures with the `reader` editor; the worker trains with the `trainer` editor.
In one process both share the model and its lock, which serves them in turn."""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError
from sqlalchemy.orm import Session

from baft_core import EditConfig, Editor, EditRequest, load_model
from baft_core.checkpoint import Checkpoint, CheckpointError
from baft_core.encoding import encode_prompt
from baft_core.generation import ContinuousBatch, FinishReason, Row
from baft_core.metrics import evaluate, with_subject_probes

from . import crud
from .db import make_engine, make_sessionmaker, migrate
from .metrics import Metrics
from .models import Version
from .scheduler import FairLock, Scheduler
from .settings import Settings
from .store import CheckpointStore

log = logging.getLogger(__name__)


class NotFound(LookupError):
    """An unknown edit or version id."""


class InvalidRequest(ValueError):
    """The request cannot be served as sent (a prompt too long for the context, a limit
    exceeded): the routes answer 422 (400 on /v1) with the message as the reason. Any other
    exception is an internal error: 500, logged."""


class Unavailable(RuntimeError):
    """The current version's state cannot be loaded: generation from it waits for a restore."""


def _no_pieces() -> Generator[str, None, None]:
    yield from ()


@dataclass
class Generation:
    version: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)  # filled while `pieces` is iterated
    pieces: Generator[str, None, None] = field(default_factory=_no_pieces)  # closing it cancels the row
    finish_reason: FinishReason | None = None  # "stop" or "length", once `pieces` is exhausted
    first_token_s: float | None = None  # seconds from submission to the first token


def freeze_heap() -> None:
    """Takes every object that exists now out of the cyclic garbage collector's reach. What a
    process makes as it starts (the model, its tokenizer, the imported modules) lives as long as
    the process, yet each full collection walked all of it while holding the GIL, and no request,
    decoding step or training step of the process moved meanwhile (docs/serving.md,
    `bench/gc_pause.py`). Frozen, a full collection walks only what came later. Nothing frozen
    leaks when it is dropped: refcounting frees it, and the adapters an edit or a restore
    replaces hold no reference cycles."""
    gc.collect()
    gc.freeze()


class Runtime:
    def __init__(self, settings: Settings, train: bool):
        self.settings = settings
        self.train = train
        self.engine = make_engine(settings.db_url)
        self.sessions = make_sessionmaker(self.engine)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.identity = ""
        self.reader: Editor | None = None
        self.trainer: Editor | None = None
        self.store: CheckpointStore | None = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics()
        # evaluate() measures the adapter attached to the reader, so measuring an older version
        # swaps it in there: one measurement at a time.
        self._measure_lock = threading.Lock()

    def session(self) -> Session:
        return self.sessions()

    def migrate(self) -> None:
        migrate(self.settings.db_url)

    def edit_config(self) -> EditConfig:
        config = EditConfig.from_dict(self.settings.edit_config)
        config.validate()
        return config

    def load(self) -> None:
        """Loads the model and makes sure the base version exists (seconds to a minute)."""
        s = self.settings
        loaded = load_model(s.model, device=s.device, dtype=s.dtype, cache_dir=s.models_dir)
        self.identity = loaded.identity
        log.info("model %s loaded (%s)", loaded.identity, loaded.precision)
        self.reader = Editor(loaded.model, loaded.tokenizer, self.edit_config(), unrelated_prompts=[])
        # One lock per model (forwards never overlap), granted in turn to decoding and training.
        self.reader.lock = FairLock()
        if self.train:
            self.trainer = Editor(loaded.model, loaded.tokenizer, self.edit_config())
            self.trainer.lock = self.reader.lock
        reader = self.reader
        if reader.attachment.classes is not None:  # not in the first request whose prompt needs it
            reader.attachment.classes.build()
        batch = ContinuousBatch(reader.model, reader.attachment, reader.config.prompt_positions, reader.pad_id, reader.lock)
        self.scheduler = Scheduler(batch, s.decode_batch_size)
        self.scheduler.start()
        device = next(loaded.model.parameters()).device
        shared = self.sessions if s.checkpoint_storage == "database" else None
        self.store = CheckpointStore(s.checkpoints_dir, loaded.identity, device, sessions=shared)
        crud.ensure_base_version(self.sessions, self._save_base)
        freeze_heap()
        self.ready.set()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    # What `load` makes: read once it has run (the routes wait for `ready`, the worker loads first).
    @property
    def loaded_reader(self) -> Editor:
        assert self.reader is not None, "the model is not loaded yet"
        return self.reader

    @property
    def loaded_trainer(self) -> Editor:
        assert self.trainer is not None, "the model is not loaded yet, or this process does not train"
        return self.trainer

    @property
    def loaded_store(self) -> CheckpointStore:
        assert self.store is not None, "the model is not loaded yet"
        return self.store

    @property
    def loaded_scheduler(self) -> Scheduler:
        assert self.scheduler is not None, "the model is not loaded yet"
        return self.scheduler

    @property
    def model_name(self) -> str:
        """The base model's name in the OpenAI API: the bundled name, or the directory's."""
        return Path(self.settings.model).name

    def _save_base(self) -> tuple[str, str, int]:
        reader, store = self.loaded_reader, self.loaded_store
        reader.load_state(reader.new_interventions(), [])
        sha256, path = store.save(reader)
        return sha256, str(path), store.size(sha256)

    # ----- reading versions -----
    def version_state(self, version_id: int | None) -> tuple[Version, Checkpoint]:
        """The given version (current if None) and its adapter state."""
        with self.session() as session:
            version = (
                crud.current_version(session) if version_id is None else crud.get_version(session, version_id)
            )
        if version is None:
            raise NotFound(f"version {version_id} does not exist" if version_id else "no version yet")
        try:
            return version, self.loaded_store.load(version.checkpoint_sha256)
        except CheckpointError as err:
            if version_id is not None:
                raise  # that version only: the client may ask for another
            raise Unavailable(
                f"the current version {version.id} cannot be loaded ({err}); restore a version to recover"
            ) from err

    # ----- generation -----
    def prompt_ids(self, prompt: str) -> list[int]:
        reader = self.loaded_reader
        try:
            ids = encode_prompt(reader.tokenizer, prompt, reader.context)
        except ValueError as err:  # empty, or longer than the context
            raise InvalidRequest(str(err)) from None
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens")
        return ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation in the model's own chat template, ready for the assistant's turn."""
        reader = self.loaded_reader
        tokenizer = reader.tokenizer
        if not tokenizer.chat_template:
            raise InvalidRequest(f"model {self.model_name} has no chat template: use completions")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as err:  # the template's own checks (e.g. the order of roles)
            raise InvalidRequest(f"the chat template refused these messages: {err}") from None
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > reader.context:
            raise InvalidRequest(f"the conversation is {len(ids)} tokens, longer than the model's context of {reader.context}")
        return ids

    def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        version_id: int | None = None,
    ) -> Generation:
        """Validates and resolves the version before returning, so that errors surface before a
        streamed response starts; iterating the result submits the row to the scheduler and
        yields its text piece by piece. Closing it early cancels the row."""
        reader = self.loaded_reader
        context = reader.context
        if len(prompt_ids) + max_new_tokens > context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {context} tokens"
            )
        version, checkpoint = self.version_state(version_id)
        tokenizer = reader.tokenizer
        row = Row(
            list(prompt_ids),
            max_new_tokens,
            checkpoint.interventions,
            temperature,
            top_p,
            torch.Generator(device=reader.device).manual_seed(seed) if seed is not None else None,
            frozenset({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else ()),
        )
        generation = Generation(version.id, len(prompt_ids))

        def pieces() -> Generator[str, None, None]:
            ticket = self.loaded_scheduler.submit(row)
            tokens, emitted = generation.token_ids, ""
            for token in ticket.tokens():
                if generation.first_token_s is None:
                    assert ticket.first_token is not None  # stamped before the first token is handed over
                    generation.first_token_s = ticket.first_token - ticket.submitted
                if token in row.eos_ids:
                    break
                tokens.append(token)
                # Decoding the whole sequence keeps multi-token characters intact.
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(emitted) and not text.endswith("\ufffd"):
                    yield text[len(emitted) :]
                    emitted = text
            generation.finish_reason = row.finish_reason

        generation.pieces = pieces()
        return generation

    def generate(self, prompt: str, max_new_tokens: int, **options) -> dict:
        start = time.perf_counter()
        generation = self.stream(self.prompt_ids(prompt), max_new_tokens, **options)
        text = "".join(generation.pieces)
        self.metrics.observe_generation(len(generation.token_ids), time.perf_counter() - start)
        return {
            "text": text,
            "version": generation.version,
            "tokens": len(generation.token_ids),
            "seconds": time.perf_counter() - start,
        }

    # ----- metrics -----
    def measure(self, request: dict, version_id: int | None) -> tuple[int, dict]:
        """Metrics of one edit on a version (current if None) without touching the worker."""
        version, checkpoint = self.version_state(version_id)
        edit = EditRequest.from_dict(request)
        with self._measure_lock:
            reader = self.loaded_reader
            reader.load_state(checkpoint.interventions, checkpoint.history)
            [row] = evaluate(reader, with_subject_probes(reader, [edit]))
        return version.id, row
