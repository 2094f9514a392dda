"""The worker: applies queued edits (one by one, or gathered into batches) and restores, in the
order they were accepted, each producing a new version.

One trainer per history: a worker trains only while it holds the trainer lease in the database
(renewed by a heartbeat thread); any number of others stand by, with the model loaded, and take
over when the holder stops renewing. The database fences a holder that lost the lease without
knowing it (paused, partitioned): its claims and its versions are conditional on its lease epoch
and on the head it built on, so it cannot fork the history. Exactly-once: an edit's row turns
`applied`, with its version, in the transaction that moves the head to that version."""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from prometheus_client import start_http_server

from baft_core import EditRequest
from baft_core.metrics import evaluate, locality_baseline, with_subject_probes

from . import crud
from .models import Edit, Restore
from .queue import Doorbell
from .runtime import Runtime, freeze_heap

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # an edit whose training crashes this often is marked failed


class LeaseLost(Exception):
    """Another worker took the trainer lease over: this one's state is no longer the head's."""


class Worker:
    def __init__(
        self,
        runtime: Runtime,
        doorbell: Doorbell | None = None,
        wake: threading.Event | None = None,
    ):
        self.rt = runtime
        self.doorbell = doorbell
        self.wake = wake or threading.Event()  # set by an in-process API when work arrives
        self.metrics = runtime.metrics
        self.stop = threading.Event()  # no new work after the current item
        self.name = runtime.settings.worker_name
        self.epoch: int | None = None  # the lease epoch this worker holds
        self.head_id: int | None = None  # the version whose state the trainer holds
        self.broken: str | None = None  # why the head's state could not be loaded
        self._lost = threading.Event()  # the heartbeat found the lease taken over
        self._finished = threading.Event()  # the main loop has ended: the heartbeat stops
        self._recover = False  # a step failed: own claims go back to the queue first
        self._first_seen: dict[int, float] = {}  # when a batched edit was first seen queued
        self._redis_down = False

    @property
    def _lease_epoch(self) -> int:
        """`epoch` while this worker holds the lease: steps run only then."""
        assert self.epoch is not None, "no trainer lease held"
        return self.epoch

    @property
    def _head_version(self) -> int:
        """`head_id` once `resume` has set it (when the lease is taken)."""
        assert self.head_id is not None, "no head version loaded"
        return self.head_id

    # ----- lifecycle -----
    def run(self) -> None:
        heartbeat = threading.Thread(target=self._heartbeat, name="baft-lease", daemon=True)
        heartbeat.start()
        settings = self.rt.settings
        try:
            try:  # the lease first: /ready waits for a trainer, not for its preparation
                self._acquire()
            except Exception:  # the loop tries again; a half-done takeover resumes there
                log.exception("could not try for the trainer lease yet")
                self._recover = True
            try:  # before any edit waits on it (a standby too); else the first edit computes it
                self.rt.loaded_trainer.prepare()
                freeze_heap()  # what it computed lives as long as the process
            except Exception:
                log.exception("could not prepare the editor; the first edit will")
            while not self.stop.is_set():
                try:
                    if self.epoch is None or self._lost.is_set():
                        self.epoch = None
                        if not self._acquire():
                            self._idle(settings.poll_interval_s)
                            continue
                    if self._recover:
                        self._requeue_own()
                    self.step()
                except LeaseLost as err:
                    log.warning("worker %s lost the trainer lease: %s; standing by", self.name, err)
                    self.epoch = None
                except Exception:
                    log.exception("worker step failed; its edits go back to the queue")
                    self._recover = True
                    self.stop.wait(1)
        finally:
            self._finished.set()
            self._release()

    def _acquire(self) -> bool:
        self._lost.clear()
        with self.rt.session() as session:
            epoch = crud.acquire_lease(session, self.name, self.rt.settings.lease_ttl_s)
        if epoch is None:
            return False
        self.epoch = epoch
        self.resume()
        log.info("worker %s holds the trainer lease (epoch %d) at version %d", self.name, epoch, self.head_id)
        return True

    def _release(self) -> None:
        if self.epoch is None:
            return
        try:
            with self.rt.session() as session:
                crud.requeue_claims(session, self.epoch)
                crud.release_lease(session, self.epoch)
            log.info("worker %s released the trainer lease", self.name)
        except Exception as err:  # the lease then expires by itself
            log.warning("could not release the trainer lease: %s", err)
        self.epoch = None

    def _heartbeat(self) -> None:
        """Renews the lease while the main thread trains (an edit can outlast the lease)."""
        ttl = self.rt.settings.lease_ttl_s
        while not self._finished.wait(ttl / 3):
            epoch = self.epoch
            if epoch is None:
                continue
            try:
                with self.rt.session() as session:
                    held = crud.renew_lease(session, epoch, ttl)
            except Exception as err:  # the database is away: retried; the fencing keeps it safe
                log.warning("could not renew the trainer lease: %s", err)
                continue
            if not held:
                self._lost.set()

    def _requeue_own(self) -> None:
        with self.rt.session() as session:
            count = crud.requeue_claims(session, self._lease_epoch)
        if count:
            log.info("re-queued %d edits of the failed step", count)
        self.resume()
        self._recover = False

    def resume(self) -> None:
        """Back to the head version's state. A head that cannot be loaded does not stop the
        worker: it then runs only restores (the way out), edits wait."""
        with self.rt.session() as session:
            version = crud.current_version(session)
        assert version is not None  # the base version is made when the model is loaded
        try:
            checkpoint = self.rt.loaded_store.load(version.checkpoint_sha256)
            self.rt.loaded_trainer.load_state(checkpoint.interventions, checkpoint.history)
            self.broken = None
        except Exception as err:
            self.broken = f"version {version.id} cannot be loaded: {type(err).__name__}: {err}"
            log.error("%s; edits wait until a version is restored", self.broken)
        self.head_id = version.id

    def _idle(self, seconds: float) -> None:
        if self.doorbell is None:
            self.wake.wait(seconds)
            self.wake.clear()
            return
        try:
            self.doorbell.wait(int(seconds * 1000))
            if self._redis_down:
                log.info("the doorbell is back")
            self._redis_down = False
        except redis.RedisError as err:
            if not self._redis_down:
                log.warning("doorbell unreachable (%s): polling the database", err)
            self._redis_down = True
            self.stop.wait(seconds)

    # ----- the log, in order -----
    def step(self) -> None:
        if self._lost.is_set():
            raise LeaseLost("the heartbeat found another epoch")
        settings = self.rt.settings
        edits: list[Edit]
        restore: Restore | None
        with self.rt.session() as session:
            if self.broken:
                edits, restore = [], crud.first_queued_restore(session)
            else:
                edits, restore = crud.next_work(session, settings.batch_size * 2)
        if restore is not None:
            self.apply_restore(restore)
            return
        if not edits:
            self._idle(settings.poll_interval_s)
            return
        now = time.monotonic()
        self._first_seen = {e.id: self._first_seen.get(e.id, now) for e in edits}
        head = edits[0]
        if head.mode != "batched":
            self.apply([head], batched=False)
            return
        run: list[Edit] = []
        for edit in edits:
            if edit.mode != "batched" or len(run) == settings.batch_size:
                break
            run.append(edit)
        wait_left = settings.batch_wait_ms / 1000 - (now - self._first_seen[head.id])
        if len(run) < settings.batch_size and len(run) == len(edits) and wait_left > 0:
            self._idle(wait_left)  # gather more of the batch first
            return
        self.apply(run, batched=True)

    # ----- applying -----
    def apply(self, queued: list[Edit], batched: bool) -> None:
        trainer, settings = self.rt.loaded_trainer, self.rt.settings
        began = time.perf_counter()
        with self.rt.session() as session:
            rows = crud.claim_edits(session, [e.id for e in queued], self._lease_epoch)
        if not rows:  # taken over, or the rows changed: look again
            if self._lost.is_set():
                raise LeaseLost("claim refused")
            return
        requests, good, bad = [], [], []
        for row in rows:
            try:
                request = EditRequest.from_dict(row.request)
                if not trainer.encode(request.prompt, request.target).prompt:  # fits the context?
                    raise ValueError("the prompt encodes to no tokens")
                requests.append(request)
                good.append(row)
            except (ValueError, TypeError) as err:
                bad.append((row, f"invalid edit: {err}"))
        if rows[0].attempts > MAX_ATTEMPTS:
            bad += [(row, f"gave up after {MAX_ATTEMPTS} attempts") for row in good]
            good, requests = [], []
        self._fail(bad)
        if not good:
            return
        measured = with_subject_probes(trainer, requests) if settings.evaluate_on_apply else requests
        baseline = locality_baseline(trainer, measured) if settings.evaluate_on_apply else None
        result = trainer.edit_batch(requests) if batched else trainer.edit(requests[0])
        metrics: Sequence[dict[str, Any] | None] = [None] * len(requests)
        if settings.evaluate_on_apply:
            try:
                metrics = evaluate(trainer, measured, baseline)
            except ValueError as err:  # a probe too long for the context: keep the edit, say why
                metrics = [{"error": str(err)}] * len(requests)
        with self.rt.session() as session:  # the checkpoint the trainer's state was loaded from
            head = crud.get_version(session, self._head_version)
            assert head is not None  # version rows are never deleted
            parent = head.checkpoint_sha256
        store = self.rt.loaded_store
        sha256, path = store.save(trainer, parent)  # durable before any row points at it
        weights = {str(layer): w for layer, w in result.basis_weights.items()}
        with self.rt.session() as session:
            crud.ensure_checkpoint(session, sha256, str(path), store.size(sha256))
            kind = "batch" if batched else "edit"
            version = crud.new_version(session, kind, sha256, len(trainer.history), self.head_id)
            self._advance(session, version.id)
            for row, row_metrics in zip(good, metrics):
                claimed = crud.finish_claimed(
                    session, row.id, self._lease_epoch, status="applied", version_id=version.id,
                    steps=result.steps, loss=result.loss, train_seconds=result.seconds,
                    losses=result.losses, basis_weights=weights, metrics=row_metrics,
                )
                if not claimed:
                    session.rollback()
                    raise LeaseLost(f"edit {row.id} is no longer claimed by epoch {self.epoch}")
            session.commit()
        self.head_id = version.id
        self.metrics.edit_apply_seconds.labels(kind).observe(time.perf_counter() - began)
        log.info("applied edits %s as version %d", [row.id for row in good], version.id)

    def _advance(self, session, version_id: int) -> None:
        if not crud.advance_head(session, self._lease_epoch, self._head_version, version_id):
            session.rollback()
            raise LeaseLost(f"version {self.head_id} is no longer the head, or epoch {self.epoch} ended")

    def _fail(self, failures: list[tuple[Edit, str]]) -> None:
        if not failures:
            return
        with self.rt.session() as session:
            for row, reason in failures:
                if not crud.finish_claimed(session, row.id, self._lease_epoch, status="failed", error=reason):
                    session.rollback()
                    raise LeaseLost(f"edit {row.id} is no longer claimed by epoch {self.epoch}")
            session.commit()
        log.info("failed edits %s: %s", [row.id for row, _ in failures], failures[0][1])

    # ----- restores -----
    def apply_restore(self, restore: Restore) -> None:
        """Any error in loading the target fails the restore with its reason (it must not block
        the log); database errors leave it queued, to be tried again."""
        began = time.perf_counter()
        with self.rt.session() as session:
            target = crud.get_version(session, restore.target_version_id)
        assert target is not None  # a restore's target is a version (a foreign key)
        try:
            checkpoint = self.rt.loaded_store.load(target.checkpoint_sha256)
            self.rt.loaded_trainer.load_state(checkpoint.interventions, checkpoint.history)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            log.error("restore %d of version %d failed: %s", restore.id, target.id, reason)
            with self.rt.session() as session:
                crud.finish_restore(session, restore.id, status="failed", error=reason)
                session.commit()
            if not self.broken:
                self.resume()  # the trainer may hold part of the target now
            return
        with self.rt.session() as session:
            version = crud.new_version(
                session, "restore", target.checkpoint_sha256, len(checkpoint.history), self.head_id,
                restored_from_id=target.id,
            )
            self._advance(session, version.id)
            if not crud.finish_restore(session, restore.id, status="done", version_id=version.id):
                session.rollback()
                raise LeaseLost(f"restore {restore.id} is no longer queued")
            session.commit()
        self.head_id, self.broken = version.id, None
        self.metrics.edit_apply_seconds.labels("restore").observe(time.perf_counter() - began)
        log.info("restored version %d as version %d", target.id, version.id)


def run_worker(runtime: Runtime) -> None:
    """`python -m app worker`: a stand-alone worker (the trainer, or a standby)."""
    settings = runtime.settings
    runtime.migrate()
    runtime.load()
    doorbell = Doorbell(settings.redis_url, settings.redis_stream, settings.redis_stream_maxlen) if settings.redis_url else None
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host, registry=runtime.metrics.registry)
    worker = Worker(runtime, doorbell)

    def graceful(signum, _frame) -> None:
        # The edit in hand is finished and committed, the lease released for a standby.
        log.info("signal %d: finishing the current item, then stopping", signum)
        worker.stop.set()

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    log.info("worker %s started (%s)", settings.worker_name, "doorbell " + settings.redis_stream if doorbell else "polling")
    worker.run()
