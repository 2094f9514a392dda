"""One history, whoever runs it: two real worker processes on PostgreSQL never fork the chain, a
standby takes over from a killed trainer, the database fences a trainer that lost its lease,
restores keep their place in the log, and a stopped worker finishes its edit first."""
from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from service_support import (
    TINY_EDIT_CONFIG,
    postgres_schema,
    service_env,
    start,
    stop,
    tiny_settings,
    wait_ready,
    wait_until,
)
from sqlalchemy import update

from app import crud
from app.audit import audit
from app.client import Client
from app.db import make_engine, make_sessionmaker, migrate
from app.main import create_app
from app.models import Chain
from baft_core import EditRequest

pytestmark = pytest.mark.services

SLOW_EDITS = {**TINY_EDIT_CONFIG, "max_steps": 30, "stop_loss": 0.0}


def worker_env(settings, **extra: str) -> dict[str, str]:
    env = {
        "MODEL": settings.model,
        "MODELS_DIR": str(settings.models_dir),
        "DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.db_url,
        "DEVICE": "cpu",
        "EDIT_CONFIG": json.dumps(settings.edit_config),
        "POLL_INTERVAL_S": "0.2",
        "LEASE_TTL_S": "3",
        "EVALUATE_ON_APPLY": "false",
        **extra,
    }
    if settings.redis_url:
        env.update(REDIS_URL=settings.redis_url, REDIS_STREAM=settings.redis_stream)
    return service_env(env)


def chain_row(settings) -> Chain:
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return crud.get_chain(session)
    finally:
        engine.dispose()


def run_audit(settings) -> dict:
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return audit(session, settings.checkpoints_dir)
    finally:
        engine.dispose()


def test_two_workers_one_linear_history_with_takeover(tiny_dir, tmp_path, postgres_url, redis_url):
    """Two stand-alone workers with default (unique) names race for the same log; the trainer is
    killed halfway and the standby takes over. The chain stays linear and holds every edit once,
    in order; the restore sits where it was accepted; reverted edits say they are not current."""
    stream = f"test-history-{uuid.uuid4().hex[:8]}"
    with postgres_schema(postgres_url) as database:
        settings = tiny_settings(
            tiny_dir, tmp_path, database_url=database, redis_url=redis_url, redis_stream=stream,
            evaluate_on_apply=False,
        )
        migrate(settings.db_url)
        env = worker_env(settings)
        logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
        workers = [start(["worker"], env, log) for log in logs]
        try:
            with TestClient(create_app(settings)) as http:
                wait_ready(http)
                client = Client(http=http)
                first = [client.edit(f"Person {i}", "was born in", f"City {i}")["id"] for i in range(6)]
                restore: dict = {}
                restorer = threading.Thread(target=lambda: restore.update(client.restore(1)))
                restorer.start()
                wait_until(lambda: http.get("/restores/1").status_code in (200, 202), 30, what="the restore row")
                second = [client.edit(f"Person {i}", "lives in", f"Town {i}")["id"] for i in range(6, 10)]
                # kill whichever worker trains now; the other must carry on
                wait_until(lambda: client.get_edit(first[2])["status"] == "applied", 120, what="some progress")
                holder = chain_row(settings).trainer
                victim = next(w for w in workers if holder.endswith(f"-{w.pid}"))
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                edits = [client.wait(i, timeout=180) for i in [*first, *second]]
                restorer.join(120)
                final_chain = chain_row(settings)
                assert final_chain.trainer != holder and final_chain.epoch >= 2
                assert [e["status"] for e in edits] == ["applied"] * 10, [logs[0].read_text()[-1500:], logs[1].read_text()[-1500:]]
                current = {e["id"]: e["in_current_version"] for e in (client.get_edit(i) for i in [*first, *second])}
                assert [current[i] for i in first] == [False] * 6  # the restore of version 1 reverted them
                assert [current[i] for i in second] == [True] * 4
                assert restore["status"] == "done"
                head = client.versions(limit=500)["items"][-1]
                assert client.generate("Hello", max_new_tokens=2)["version"] == head["id"]
        finally:
            for worker in workers:
                stop(worker)
            redis.Redis.from_url(redis_url).delete(stream)
        report = run_audit(settings)
        assert report["ok"], report["problems"]
        assert report["edits"] == {"applied": 10} and report["edits_in_head"] == 4
        assert report["restores"]["done"] == 1


def test_a_fenced_trainer_cannot_claim_or_extend_the_history(postgres_url):
    """The lease, read in the database: a takeover re-queues the old holder's claims, and the old
    holder (alive, unaware) can neither claim an edit nor add a version."""
    with postgres_schema(postgres_url) as database:
        migrate(database)
        engine = make_engine(database)
        sessions = make_sessionmaker(engine)
        try:
            with sessions() as session:
                base = crud.ensure_base_version(sessions, lambda: ("0" * 64, "base", 1))
                [first, second] = crud.add_edits(session, [_row("a"), _row("b")])
                a = crud.acquire_lease(session, "worker-a", ttl=30)
                assert a == 1 and crud.acquire_lease(session, "worker-b", ttl=30) is None
                assert [e.id for e in crud.claim_edits(session, [first.id], a)] == [first.id]
                # worker-a stops renewing (paused): its lease runs out and worker-b takes over
                session.execute(update(Chain).values(lease_expires=0.0))
                session.commit()
                b = crud.acquire_lease(session, "worker-b", ttl=30)
                assert b == 2
                assert crud.get_edit(session, first.id).status == "queued"  # back in the queue
                assert crud.claim_edits(session, [second.id], a) == []
                assert not crud.renew_lease(session, a, ttl=30)
                version = crud.new_version(session, "edit", "0" * 64, 1, base.id)
                assert not crud.advance_head(session, a, base.id, version.id)
                session.rollback()
                # worker-b extends the history; worker-a's stale parent no longer is the head
                [claimed] = crud.claim_edits(session, [first.id], b)
                version = crud.new_version(session, "edit", "0" * 64, 1, base.id)
                assert crud.advance_head(session, b, base.id, version.id)
                assert crud.finish_claimed(session, first.id, b, status="applied", version_id=version.id)
                session.commit()
                late = crud.new_version(session, "edit", "0" * 64, 1, base.id)
                assert not crud.advance_head(session, b, base.id, late.id)  # parent is not the head
                session.rollback()
                assert crud.head_id(session) == version.id
        finally:
            engine.dispose()


def _row(subject: str) -> dict:
    request = EditRequest.from_triple(subject, "lives in", "Oslo").to_dict()
    return dict(mode="continual", subject=subject, relation="lives in", object="Oslo", request=request)


def test_log_order_restore_waits_for_earlier_edits(tmp_path):
    """Edits accepted before a restore are applied before it, later ones after it."""
    database = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(database)
    engine = make_engine(database)
    sessions = make_sessionmaker(engine)
    try:
        with sessions() as session:
            base = crud.ensure_base_version(sessions, lambda: ("0" * 64, "base", 1))
            early = crud.add_edits(session, [_row("a"), _row("b")])
            restore = crud.add_restore(session, base.id)
            late = crud.add_edits(session, [_row("c")])
            assert restore.after_edit_id == early[-1].id
            edits, found = crud.next_work(session, 10)
            assert [e.id for e in edits] == [e.id for e in early] and found is None
            epoch = crud.acquire_lease(session, "w", 30)
            crud.claim_edits(session, [e.id for e in early], epoch)
            assert crud.next_work(session, 10) == ([], None)  # still applying: the restore waits
            for e in early:
                crud.finish_claimed(session, e.id, epoch, status="applied")
            session.commit()
            edits, found = crud.next_work(session, 10)
            assert edits == [] and found.id == restore.id
            crud.finish_restore(session, restore.id, status="done")
            session.commit()
            edits, found = crud.next_work(session, 10)
            assert [e.id for e in edits] == [late[0].id] and found is None
    finally:
        engine.dispose()


def test_sigterm_finishes_the_edit_and_hands_over(tiny_dir, tmp_path, postgres_url):
    """A deploy stops the trainer mid-edit: the edit is finished (one attempt, not a failure),
    the lease released, and the standby (no Redis here: it polls) carries on at once."""
    with postgres_schema(postgres_url) as database:
        settings = tiny_settings(tiny_dir, tmp_path, database_url=database, edit_config=SLOW_EDITS)
        migrate(settings.db_url)
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        first = start(["worker"], worker_env(settings, WORKER_NAME="first", LEASE_TTL_S="60"), logs[0])
        try:
            wait_until(lambda: chain_row(settings).trainer == "first", 120, what="the first worker's lease")
            second = start(["worker"], worker_env(settings, WORKER_NAME="second", LEASE_TTL_S="60"), logs[1])
            engine = make_engine(settings.db_url)
            sessions = make_sessionmaker(engine)
            try:
                with sessions() as session:
                    ids = [e.id for e in crud.add_edits(session, [_row("a"), _row("b")])]
                wait_until(lambda: _status(sessions, ids[0]) == "applying", 120, 0.05, what="training")
                began = time.monotonic()
                first.send_signal(signal.SIGTERM)
                assert first.wait(60) == 0
                with sessions() as session:
                    edit = crud.get_edit(session, ids[0])
                    assert edit.status == "applied" and edit.attempts == 1, logs[0].read_text()[-2000:]
                # released, not expired: the 60 s lease does not hold the standby up
                wait_until(lambda: _status(sessions, ids[1]) == "applied", 50, what="the standby")
                assert time.monotonic() - began < 50
                assert chain_row(settings).trainer == "second"
            finally:
                engine.dispose()
                stop(second)
        finally:
            stop(first)


def _status(sessions, edit_id: int) -> str:
    with sessions() as session:
        return crud.get_edit(session, edit_id).status
