"""One API process: its runtime, the doorbell it rings, and (without Redis) a worker thread in
the same process (the trainer, or a standby when another process holds the trainer lease)."""
from __future__ import annotations

import logging
import math
import threading
from datetime import timedelta

from . import crud
from .models import utcnow
from .queue import Doorbell
from .runtime import InvalidRequest, Runtime
from .schemas import EditIn
from .settings import Settings
from .worker import Worker

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        in_process = not settings.redis_url
        self.runtime = Runtime(settings, train=in_process)
        self.doorbell = (
            None if not settings.redis_url else Doorbell(settings.redis_url, settings.redis_stream, settings.redis_stream_maxlen)
        )
        self.wake = threading.Event()
        self.worker: Worker | None = None
        self.migrated = threading.Event()
        self.runtime.metrics.watch_database(self.runtime.sessions)
        self._thread: threading.Thread | None = None
        self._state: tuple[int | None, set[int]] = (None, set())
        self._state_lock = threading.Lock()

    def start(self) -> None:
        """Migrates and loads the model in the background: /health answers at once, /ready once
        all is up."""
        self._thread = threading.Thread(target=self._boot, name="baft-boot", daemon=True)
        self._thread.start()

    def _boot(self) -> None:
        try:
            self.runtime.migrate()
            self.migrated.set()
            self.runtime.load()
        except Exception as err:
            log.exception("start-up failed")
            self.runtime.load_error = f"{type(err).__name__}: {err}"
            return
        if self.doorbell is None:
            self.worker = Worker(self.runtime, wake=self.wake)
            self.worker.run()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.shutdown_grace_s)
        self.runtime.close()
        self.runtime.engine.dispose()

    def worker_alive(self) -> bool:
        return self.worker is not None and self._thread is not None and self._thread.is_alive()

    def trainer_status(self) -> str:
        """"ok" while some worker (here or in another process) holds a live trainer lease."""
        with self.runtime.session() as session:
            chain = crud.get_chain(session)
            now = crud.db_now(session)
        if chain.trainer is None or chain.lease_expires <= now:
            silent = f" (last heartbeat {now - chain.heartbeat:.0f} s ago)" if chain.heartbeat else ""
            return f"no worker holds the trainer lease{silent}"
        return "ok"

    def check_tokens(self, edits: list[EditIn]) -> None:
        """Rejects (InvalidRequest) edits too long for the model's context, once the model is loaded;
        before that the worker checks and fails them with the reason."""
        reader = self.runtime.reader
        if not self.runtime.ready.is_set() or reader is None:
            return
        for edit in edits:
            request = edit.to_request()
            pairs = [(p, request.target) for p in [request.prompt, *request.rephrases]]
            pairs += [(p.prompt, p.answer) for p in [*request.locality, *request.portability]]
            for prompt, answer in pairs:
                try:
                    example = reader.encode(prompt, answer)
                except ValueError as err:  # longer than the context
                    raise InvalidRequest(str(err)) from None
                if not example.prompt:
                    raise InvalidRequest(f"prompt {prompt!r} encodes to no tokens")

    def retry_after(self, depth: int, wanted: int) -> int:
        """Seconds until about `wanted` more edits fit, at the last minute's apply rate."""
        with self.runtime.session() as session:
            rate = crud.applied_since(session, utcnow() - timedelta(seconds=60)) / 60
        excess = depth + wanted - self.settings.max_queue
        return 30 if rate == 0 else max(1, min(300, math.ceil(excess / rate)))

    def in_current_version(self, session) -> set[int]:
        """The versions whose edits the current version holds (cached per head)."""
        head = crud.head_id(session)
        with self._state_lock:
            if self._state[0] != head:
                self._state = (head, crud.state_versions(session, head) if head else set())
            return self._state[1]

    def notify(self, what: str) -> None:
        """After the rows are committed: wake the worker (without Redis, the in-process one)."""
        if self.doorbell is None:
            self.wake.set()
        else:
            self.doorbell.ring(what)
