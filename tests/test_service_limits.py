"""Safe defaults and backpressure: no open server off loopback, no cross-site writes, request
bodies and the queue bounded with clear 413/415/429 answers, the stream trimmed."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from service_support import REPO, free_port, service_env, tiny_settings, wait_until

from app.__main__ import is_loopback
from app.main import create_app
from app.queue import Doorbell

EDIT = {"subject": "Alice", "relation": "lives in", "object": "Oslo"}


@pytest.fixture
def stalled(tmp_path):
    """A service whose model cannot load: edits are accepted and wait, none applies."""
    settings = tiny_settings(tmp_path / "no-such-model", tmp_path, max_queue=3, max_body_bytes=4096)
    with TestClient(create_app(settings)) as http:
        wait_until(lambda: http.get("/ready").json()["checks"]["model"].startswith("FileNotFoundError"), 30)
        yield http


def test_queue_limit_answers_429_with_retry_after(stalled):
    assert [stalled.post("/edits", json=EDIT).status_code for _ in range(3)] == [202] * 3
    full = stalled.post("/edits", json=EDIT)
    assert full.status_code == 429 and "3 edits are waiting" in full.json()["reason"]
    assert int(full.headers["Retry-After"]) >= 1
    assert stalled.get("/edits", params={"status": "queued"}).json()["total"] == 3  # nothing half-added


def test_body_limit_answers_413(stalled):
    big = {**EDIT, "rephrases": ["x" * 900] * 8}
    declared = stalled.post("/edits", json=big)
    assert declared.status_code == 413 and "4096 bytes" in declared.json()["reason"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(10):
            yield b" " * 1000

    streamed = stalled.post("/edits", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


@pytest.mark.parametrize(
    "headers,body",
    [({}, None), ({"content-type": "text/plain"}, b"{}"), ({"content-type": "application/x-www-form-urlencoded"}, b"a=1"), ({}, b"{}")],
)
def test_writes_need_a_json_body_so_no_site_can_send_them(stalled, headers, body):
    """What a cross-site page can send without a CORS preflight: no body, text/plain, a form, or a
    typeless blob (which FastAPI would otherwise parse as JSON)."""
    for path in ("/versions/1/restore", "/edits"):
        response = stalled.post(path, content=body, headers=headers)
        assert response.status_code == 415 and "application/json" in response.json()["reason"], path


def test_refuses_to_serve_off_loopback_without_keys(tmp_path):
    env = service_env({"DATA_DIR": str(tmp_path)})
    command = [sys.executable, "-m", "app", "--host", "0.0.0.0", "--port", str(free_port())]
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "without API keys" in refused.stderr
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")


@pytest.mark.services
def test_the_stream_is_trimmed(redis_url):
    stream = f"test-trim-{uuid.uuid4().hex[:8]}"
    doorbell = Doorbell(redis_url, stream, maxlen=100)
    try:
        for i in range(1000):
            assert doorbell.ring(f"edits {i}")
        assert doorbell.client.xlen(stream) < 300  # approximate trimming: whole nodes of ~100
    finally:
        redis.Redis.from_url(redis_url).delete(stream)
