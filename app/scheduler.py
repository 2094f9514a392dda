"""Continuous batching for the API: one thread decodes every running generation together.

Requests wait in a queue; at each step boundary the scheduler lets as many join the running
batch as it has room for (their prompts prefilled together), then advances every row by one
token and hands each its token. Finished rows leave at once; a streaming client that goes away
cancels its row. Rows of one batch may use different versions (`baft_core.generation`).

Decoding steps and training steps share the model through the editors' lock; a `FairLock`
serves them in arrival order, so that neither starves the other (Python's own locks let the
thread that just released re-acquire first)."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from baft_core.generation import ContinuousBatch, Row

log = logging.getLogger(__name__)


class FairLock:
    """A re-entrant lock granted in the order threads asked for it (the editors nest it)."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._waiting: deque[int] = deque()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._condition:
            if self._owner == me:
                self._depth += 1
                return True
            self._waiting.append(me)
            while self._owner is not None or self._waiting[0] != me:
                self._condition.wait()
            self._waiting.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._condition:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a FairLock this thread does not hold")
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._condition.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_DONE = object()  # the end of a ticket's tokens


@dataclass(eq=False)
class Ticket:
    """A submitted generation: its row, and the tokens as the scheduler hands them over."""

    row: Row
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter time of the first token
    _events: queue.Queue = field(default_factory=queue.Queue)
    _sent: int = 0

    def tokens(self) -> Iterator[int]:
        """The row's tokens as they come; closing the iterator early cancels the row."""
        try:
            while True:
                item = self._events.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError(f"generation failed: {item}") from item
                yield item
        finally:
            self.row.cancelled = True  # a no-op once the row has finished

    def _hand_over(self) -> None:
        tokens = self.row.tokens
        if self.first_token is None and tokens:
            self.first_token = time.perf_counter()
        for token in tokens[self._sent :]:
            self._events.put(token)
        self._sent = len(tokens)
        if self.row.finished:
            self._events.put(_DONE)


class Scheduler:
    """The decoding thread. `max_rows`: the most rows decoded together (1 where the model's
    cache cannot be shared, see `ContinuousBatch.batchable`)."""

    def __init__(self, batch: ContinuousBatch, max_rows: int):
        self.batch = batch
        self.max_rows = max_rows if ContinuousBatch.batchable(batch.model) else 1
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="baft-decode", daemon=True)
        # Decoding steps taken and rows they advanced: rows / steps is the mean batch.
        self.steps = self.rows_stepped = self.peak_rows = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, row: Row) -> Ticket:
        ticket = Ticket(row)
        with self._wake:
            if self._stop:
                raise RuntimeError("the decoding scheduler is stopped")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stop:
                    break
                room = self.max_rows - len(self._running)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            joining = [t for t in joining if not t.row.cancelled]
            try:
                if joining:
                    self._running += joining  # before the prefill: a failure fails them too
                    self.batch.join([t.row for t in joining])
                    self._hand_over()
                if self.batch.rows:
                    self.steps += 1
                    self.rows_stepped += len(self.batch.rows)
                    self.peak_rows = max(self.peak_rows, len(self.batch.rows))
                    self.batch.step()
                self._hand_over()
            except Exception as err:  # a failed forward fails the rows in it, not the thread
                log.exception("decoding step failed; %d rows fail with it", len(self._running))
                for ticket in self._running:
                    ticket._events.put(err)
                self._running = []
                self.batch = ContinuousBatch(
                    self.batch.model, self.batch.attachment, self.batch.positions, self.batch.pad_id, self.batch.lock
                )
        for ticket in [*self._running, *self._waiting]:
            ticket._events.put(RuntimeError("the server is shutting down"))

    def _hand_over(self) -> None:
        for ticket in self._running:
            ticket._hand_over()
        self._running = [t for t in self._running if not t.row.finished]
