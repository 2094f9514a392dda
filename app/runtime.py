"""What a service process holds: the database, the base model with its editors, and the
checkpoint store. The API process generates and measures with the `reader` editor; the worker
trains with the `trainer` editor. In one process both share the model and its lock."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from sqlalchemy.orm import Session

from baft_core import EditConfig, EditRequest, Editor, load_model
from baft_core.checkpoint import Checkpoint, CheckpointError
from baft_core.encoding import encode_prompt
from baft_core.generation import stream as stream_tokens
from baft_core.metrics import evaluate

from . import crud
from .db import make_engine, make_sessionmaker, migrate
from .metrics import Metrics
from .models import Version
from .settings import Settings
from .store import CheckpointStore

log = logging.getLogger(__name__)


class NotFound(LookupError):
    """An unknown edit or version id."""


class Unavailable(RuntimeError):
    """The current version's state cannot be loaded: generation from it waits for a restore."""


@dataclass
class Generation:
    version: int
    token_ids: list[int] = field(default_factory=list)  # filled while `pieces` is iterated
    pieces: Iterator[str] = iter(())


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
        if self.train:
            self.trainer = Editor(loaded.model, loaded.tokenizer, self.edit_config())
            self.reader.lock = self.trainer.lock  # one lock per model: forwards never overlap
        device = next(loaded.model.parameters()).device
        shared = self.sessions if s.checkpoint_storage == "database" else None
        self.store = CheckpointStore(s.checkpoints_dir, loaded.identity, device, sessions=shared)
        crud.ensure_base_version(self.sessions, self._save_base)
        self.ready.set()

    def _save_base(self) -> tuple[str, str, int]:
        self.reader.load_state(self.reader.new_interventions(), [])
        sha256, path = self.store.save(self.reader)
        return sha256, str(path), self.store.size(sha256)

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
            return version, self.store.load(version.checkpoint_sha256)
        except CheckpointError as err:
            if version_id is not None:
                raise  # that version only: the client may ask for another
            raise Unavailable(
                f"the current version {version.id} cannot be loaded ({err}); restore a version to recover"
            ) from err

    # ----- generation -----
    def _prompt_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        reader = self.reader
        ids = encode_prompt(reader.tokenizer, prompt, reader.context)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if len(ids) + max_new_tokens > reader.context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {reader.context} tokens"
            )
        return ids

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        version_id: int | None = None,
    ) -> "Generation":
        """Validates and resolves the version before returning, so that errors surface before a
        streamed response starts; iterating the result generates."""
        ids = self._prompt_ids(prompt, max_new_tokens)
        version, checkpoint = self.version_state(version_id)
        reader = self.reader
        generator = torch.Generator(device=reader.device).manual_seed(seed) if seed is not None else None
        tokenizer = reader.tokenizer
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

        generation = Generation(version.id)

        def pieces() -> Iterator[str]:
            tokens = generation.token_ids
            emitted = ""
            for step in stream_tokens(
                reader.model,
                [ids],
                max_new_tokens,
                reader.attachment,
                reader.config.prompt_positions,
                reader.pad_id,
                eos,
                temperature,
                top_p,
                generator,
                interventions=checkpoint.interventions,
                lock=reader.lock,
            ):
                token = int(step[0])
                if token in eos:
                    break
                tokens.append(token)
                # Decoding the whole sequence keeps multi-token characters intact.
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(emitted) and not text.endswith("\ufffd"):
                    yield text[len(emitted) :]
                    emitted = text

        generation.pieces = pieces()
        return generation

    def generate(self, prompt: str, max_new_tokens: int, **options) -> dict:
        start = time.perf_counter()
        generation = self.stream(prompt, max_new_tokens, **options)
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
            self.reader.load_state(checkpoint.interventions, checkpoint.history)
            [row] = evaluate(self.reader, [edit])
        return version.id, row
