"""The worker: applies queued edits (one by one, or gathered into batches) and restores, each
producing a new version. Exactly-once: an edit's row turns `applied`, with its version, in the
same transaction that adds the version; a redelivered or re-read edit whose row is already
final is skipped, and one left `applying` by a dead worker is trained again."""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import redis

from baft_core import EditRequest
from baft_core.checkpoint import Checkpoint, CheckpointError
from baft_core.metrics import evaluate, locality_baseline, with_subject_probes

from . import crud
from .models import Edit, utcnow
from .queue import EditQueue
from .runtime import Runtime

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # an edit whose training crashes this often is marked failed


@dataclass
class Item:
    edit_id: int
    message_id: str | None = None  # None in in-process mode (the SQL row is the queue entry)
    seen_at: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, runtime: Runtime, queue: EditQueue | None = None, wake: threading.Event | None = None):
        self.rt = runtime
        self.queue = queue
        self.wake = wake or threading.Event()  # set by an in-process API when work arrives
        self.stop = threading.Event()
        self.buffer: list[Item] = []
        self.version_id: int | None = None
        self._last_sweep = 0.0

    # ----- lifecycle -----
    def run(self) -> None:
        self.resume()
        try:  # before any edit waits on it; else the first edit computes it itself
            self.rt.trainer.prepare()
        except Exception:
            log.exception("could not prepare the editor; the first edit will")
        while not self.stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("worker step failed; resynchronising with the current version")
                time.sleep(1)
                try:
                    self.resume()
                except Exception:
                    log.exception("could not resynchronise")

    def resume(self) -> None:
        """Back to the newest version's state; edits left `applying` are queued again."""
        with self.rt.session() as session:
            crud.reset_interrupted(session)
            version = crud.current_version(session)
        checkpoint = self.rt.store.load(version.checkpoint_sha256)
        self.rt.trainer.load_state(checkpoint.interventions, checkpoint.history)
        self.version_id = version.id

    def step(self) -> None:
        self.handle_restores()
        if self.queue is not None:
            self.sweep()
        self.fill(block_ms=0 if self.buffer else 200)
        if not self.buffer:
            return
        with self.rt.session() as session:
            rows = {item.edit_id: crud.get_edit(session, item.edit_id) for item in self.buffer}
        done = [i for i in self.buffer if rows[i.edit_id] is None or rows[i.edit_id].status in crud.FINAL]
        if done:  # redelivered or stale entries: their edit is already final
            self._finish(done)
            return
        head = rows[self.buffer[0].edit_id]
        if head.mode != "batched":
            self.apply([self.buffer[0]], batched=False)
            return
        run = []
        for item in self.buffer:
            if rows[item.edit_id].mode != "batched" or len(run) == self.rt.settings.batch_size:
                break
            run.append(item)
        waited_ms = (time.monotonic() - self.buffer[0].seen_at) * 1000
        wait_left = self.rt.settings.batch_wait_ms - waited_ms
        if len(run) < self.rt.settings.batch_size and len(run) == len(self.buffer) and wait_left > 0:
            self.fill(block_ms=int(wait_left) + 1)  # gather more of the batch first
            return
        self.apply(run, batched=True)

    # ----- queue -----
    def fill(self, block_ms: int) -> None:
        known = {item.edit_id for item in self.buffer}
        want = max(1, self.rt.settings.batch_size * 2 - len(self.buffer))
        if self.queue is None:
            with self.rt.session() as session:
                rows = crud.pending_edits(session, want, exclude=known)
            if not rows and block_ms:
                self.wake.wait(block_ms / 1000)
                self.wake.clear()
                with self.rt.session() as session:
                    rows = crud.pending_edits(session, want, exclude=known)
            self.buffer += [Item(row.id) for row in rows]
            return
        try:
            entries = self.queue.fetch(want, block_ms)
        except redis.RedisError as err:
            log.warning("queue unreachable (%s); retrying", err)
            time.sleep(1)
            return
        duplicates = []
        for message_id, edit_id in entries:
            if edit_id in known:
                duplicates.append(message_id)
            else:
                known.add(edit_id)
                self.buffer.append(Item(edit_id, message_id))
        self.queue.ack(duplicates)

    def sweep(self) -> None:
        """The outbox: publish queued rows the stream never got (Redis was down at POST time, or
        lost its data), and rows published long ago that are still queued."""
        if time.monotonic() - self._last_sweep < self.rt.settings.sweep_interval_s:
            return
        self._last_sweep = time.monotonic()
        try:
            stale_before = utcnow() - timedelta(seconds=self.rt.settings.requeue_after_s)
            if not self.queue.stream_exists():
                stale_before = utcnow()
            known = {item.edit_id for item in self.buffer}
            with self.rt.session() as session:
                ids = [e.id for e in crud.edits_to_publish(session, stale_before) if e.id not in known]
                if ids and self.queue.publish(ids):
                    crud.mark_published(session, ids)
                    log.info("re-published %d queued edits", len(ids))
        except redis.RedisError as err:
            log.warning("sweep skipped, queue unreachable: %s", err)

    def _finish(self, items: list[Item]) -> None:
        finished = {id(item) for item in items}
        self.buffer = [item for item in self.buffer if id(item) not in finished]
        if self.queue is not None:
            self.queue.ack([item.message_id for item in items if item.message_id])

    # ----- applying -----
    def apply(self, items: list[Item], batched: bool) -> None:
        trainer, settings = self.rt.trainer, self.rt.settings
        with self.rt.session() as session:
            rows: list[Edit] = [crud.get_edit(session, item.edit_id) for item in items]
            for row in rows:
                row.status, row.started_at, row.attempts = "applying", utcnow(), row.attempts + 1
            session.commit()
        requests, good, bad = [], [], []
        for item, row in zip(items, rows):
            try:
                request = EditRequest.from_dict(row.request)
                if not trainer.encode(request.prompt, request.target).prompt:  # fits the context?
                    raise ValueError("the prompt encodes to no tokens")
                requests.append(request)
                good.append((item, row))
            except (ValueError, TypeError) as err:
                bad.append((item, row, f"invalid edit: {err}"))
        if rows[0].attempts > MAX_ATTEMPTS:
            bad += [(item, row, f"gave up after {MAX_ATTEMPTS} attempts") for item, row in good]
            good, requests = [], []
        self._fail(bad)
        if not good:
            return
        measured = with_subject_probes(trainer, requests) if settings.evaluate_on_apply else requests
        baseline = locality_baseline(trainer, measured) if settings.evaluate_on_apply else None
        result = trainer.edit_batch(requests) if batched else trainer.edit(requests[0])
        metrics: list[dict | None] = [None] * len(requests)
        if settings.evaluate_on_apply:
            try:
                metrics = evaluate(trainer, measured, baseline)
            except ValueError as err:  # a probe too long for the context: keep the edit, say why
                metrics = [{"error": str(err)}] * len(requests)
        sha256, path = self.rt.store.save(trainer)
        state = Checkpoint(trainer.interventions, trainer.config, list(trainer.history), {})
        self.rt.store.put(sha256, state)
        with self.rt.session() as session:
            crud.ensure_checkpoint(session, sha256, str(path), self.rt.store.size(sha256))
            version = crud.new_version(
                session, "batch" if batched else "edit", sha256, len(trainer.history), self.version_id
            )
            weights = {str(layer): w for layer, w in result.basis_weights.items()}
            for (item, row), row_metrics in zip(good, metrics):
                edit = crud.get_edit(session, row.id)
                edit.status, edit.version_id, edit.finished_at = "applied", version.id, utcnow()
                edit.steps, edit.loss, edit.train_seconds = result.steps, result.loss, result.seconds
                edit.losses, edit.basis_weights, edit.metrics = result.losses, weights, row_metrics
            session.commit()
            self.version_id = version.id
        log.info("applied edits %s as version %d", [row.id for _, row in good], self.version_id)
        self._finish([item for item, _ in good])

    def _fail(self, failures: list[tuple[Item, Edit, str]]) -> None:
        if not failures:
            return
        with self.rt.session() as session:
            for _, row, reason in failures:
                edit = crud.get_edit(session, row.id)
                edit.status, edit.error, edit.finished_at = "failed", reason, utcnow()
            session.commit()
        self._finish([item for item, _, _ in failures])

    # ----- restores -----
    def handle_restores(self) -> None:
        with self.rt.session() as session:
            restores = crud.queued_restores(session)
            for restore in restores:
                target = crud.get_version(session, restore.target_version_id)
                try:
                    checkpoint = self.rt.store.load(target.checkpoint_sha256)
                except CheckpointError as err:
                    restore.status, restore.error, restore.finished_at = "failed", str(err), utcnow()
                    session.commit()
                    continue
                self.rt.trainer.load_state(checkpoint.interventions, checkpoint.history)
                version = crud.new_version(
                    session,
                    "restore",
                    target.checkpoint_sha256,
                    len(checkpoint.history),
                    self.version_id,
                    restored_from_id=target.id,
                )
                restore.status, restore.version_id, restore.finished_at = "done", version.id, utcnow()
                session.commit()
                self.version_id = version.id
                log.info("restored version %d as version %d", target.id, version.id)


def run_worker(runtime: Runtime) -> None:
    """`python -m app worker`: the stand-alone worker of the Redis mode."""
    settings = runtime.settings
    if not settings.redis_url:
        raise SystemExit("REDIS_URL is not set: without it `python -m app` runs the worker itself")
    runtime.migrate()
    runtime.load()
    queue = EditQueue(settings.redis_url, settings.redis_stream, settings.redis_group, settings.worker_name)
    worker = Worker(runtime, queue)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
    log.info("worker %s consuming %s", settings.worker_name, settings.redis_stream)
    worker.run()
