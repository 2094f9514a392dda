"""One API process: its runtime, the queue it publishes to, and (without Redis) the worker
thread that applies edits in the same process."""
from __future__ import annotations

import logging
import threading

from . import crud
from .queue import EditQueue
from .runtime import Runtime
from .schemas import EditIn
from .settings import Settings
from .worker import Worker

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        in_process = not settings.redis_url
        self.runtime = Runtime(settings, train=in_process)
        self.queue = (
            None if in_process else EditQueue(settings.redis_url, settings.redis_stream, settings.redis_group)
        )
        self.wake = threading.Event()
        self.worker: Worker | None = None
        self.migrated = threading.Event()
        self._thread: threading.Thread | None = None

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
        if self.queue is None:
            self.worker = Worker(self.runtime, wake=self.wake)
            self.worker.run()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.runtime.close()
        self.runtime.engine.dispose()

    def worker_alive(self) -> bool:
        return self.worker is not None and self._thread is not None and self._thread.is_alive()

    def check_tokens(self, edits: list[EditIn]) -> None:
        """Rejects (ValueError) edits too long for the model's context, once the model is loaded;
        before that the worker checks and fails them with the reason."""
        reader = self.runtime.reader
        if not self.runtime.ready.is_set() or reader is None:
            return
        for edit in edits:
            request = edit.to_request()
            pairs = [(p, request.target) for p in [request.prompt, *request.rephrases]]
            pairs += [(p.prompt, p.answer) for p in [*request.locality, *request.portability]]
            for prompt, answer in pairs:
                if not reader.encode(prompt, answer).prompt:
                    raise ValueError(f"prompt {prompt!r} encodes to no tokens")

    def enqueue(self, edit_ids: list[int]) -> None:
        """After the rows are committed: publish to the stream (the sweeper retries if Redis is
        down) or wake the in-process worker."""
        if self.queue is None:
            self.wake.set()
            return
        if self.queue.publish(edit_ids):
            with self.runtime.session() as session:
                crud.mark_published(session, edit_ids)

    def notify_restore(self) -> None:
        self.wake.set()
