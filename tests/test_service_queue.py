"""The Redis mode with a stand-alone worker process: a worker killed mid-edit and a Redis that
goes away lose no edit and apply none twice."""
from __future__ import annotations

import json
import signal
import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from service_support import (
    TINY_EDIT_CONFIG,
    free_port,
    postgres_schema,
    service_env,
    start,
    stop,
    throwaway_redis,
    tiny_settings,
    wait_ready,
    wait_until,
)

from app.client import Client
from app.main import create_app

pytestmark = pytest.mark.services

# Slow enough (no early stop) that the test can catch an edit while it trains.
SLOW_EDITS = {**TINY_EDIT_CONFIG, "max_steps": 30, "stop_loss": 0.0}


def _worker_env(settings) -> dict[str, str]:
    return service_env(
        {
            "MODEL": settings.model,
            "MODELS_DIR": str(settings.models_dir),
            "DATA_DIR": str(settings.data_dir),
            "DATABASE_URL": settings.db_url,
            "REDIS_URL": settings.redis_url,
            "REDIS_STREAM": settings.redis_stream,
            "DEVICE": "cpu",
            "EDIT_CONFIG": json.dumps(settings.edit_config),
            "POLL_INTERVAL_S": "0.2",
            "LEASE_TTL_S": "3",
        }
    )


def _edit_versions(client: Client) -> list[dict]:
    return [v for v in client.versions(limit=500)["items"] if v["kind"] == "edit"]


def test_worker_killed_mid_edit_applies_every_edit_exactly_once(tiny_dir, tmp_path, postgres_url, redis_url):
    stream = f"test-kill-{uuid.uuid4().hex[:8]}"
    with postgres_schema(postgres_url) as database:
        settings = tiny_settings(
            tiny_dir, tmp_path, database_url=database, redis_url=redis_url,
            redis_stream=stream, edit_config=SLOW_EDITS,
        )
        env, log = _worker_env(settings), tmp_path / "worker.log"
        worker = start(["worker"], env, log)
        try:
            with TestClient(create_app(settings)) as http:
                wait_ready(http)
                client = Client(http=http)
                ids = [client.edit(f"Person {i}", "was born in", f"City {i}")["id"] for i in range(3)]
                wait_until(lambda: client.get_edit(ids[1])["status"] == "applying", 120, 0.05, "edit 2 training")
                worker.send_signal(signal.SIGKILL)
                worker.wait()
                assert client.get_edit(ids[1])["status"] == "applying"
                assert client.get_edit(ids[0])["status"] == "applied"

                worker = start(["worker"], env, log)
                try:
                    edits = [client.wait(i, timeout=120) for i in ids]
                finally:
                    stop(worker)
                assert [e["status"] for e in edits] == ["applied"] * 3, log.read_text()[-2000:]
                assert edits[1]["attempts"] == 2  # trained again after the kill
                versions = _edit_versions(client)
                assert sorted(v["edits"] for v in versions) == [[i] for i in ids]  # one version each
                assert len({e["version"] for e in edits}) == 3
        finally:
            redis.Redis.from_url(redis_url).delete(stream)


def test_edits_accepted_while_redis_is_down_apply_anyway(tiny_dir, tmp_path):
    """Redis only rings the worker: with it gone the worker polls the rows, and nothing waits
    for it to come back."""
    port = free_port()
    with throwaway_redis(port) as server:
        settings = tiny_settings(tiny_dir, tmp_path, redis_url=f"redis://127.0.0.1:{port}/0")
        env, log = _worker_env(settings), tmp_path / "worker.log"
        worker = start(["worker"], env, log)
        with TestClient(create_app(settings)) as http:
            wait_ready(http)
            client = Client(http=http)
            try:
                first = client.wait(client.edit("Alice", "lives in", "Oslo")["id"], timeout=120)
                assert first["status"] == "applied", log.read_text()[-2000:]

                server.send_signal(signal.SIGKILL)
                server.wait()
                ready = http.get("/ready")
                assert ready.status_code == 503 and ready.json()["checks"]["queue"] == "redis unreachable"
                began = time.monotonic()
                during = [client.edit(f"Bob {i}", "lives in", f"Lima {i}")["id"] for i in range(2)]
                assert time.monotonic() - began < 10  # a dead Redis does not hold up acceptance
                applied_during = [client.wait(i, timeout=120)["status"] for i in during]
                assert applied_during == ["applied", "applied"], log.read_text()[-2000:]

                with throwaway_redis(port):  # back, and empty
                    wait_ready(http)
                    after = client.edit("Carol", "lives in", "Rome")["id"]
                    edits = [client.wait(i, timeout=120) for i in [*during, after]]
            finally:
                stop(worker)
        assert [e["status"] for e in edits] == ["applied"] * 3, log.read_text()[-2000:]
        assert sorted(v["edits"] for v in _edit_versions(client)) == [[first["id"]], *[[e["id"]] for e in edits]]
