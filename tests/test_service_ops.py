"""The operator's view: /metrics read by the real Prometheus parser, /ready that knows whether a
worker holds the trainer lease, and checkpoints every replica reaches through the database."""
from __future__ import annotations

import gc
import shutil
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_support import postgres_schema, tiny_settings, wait_ready, wait_until

from app.client import Client
from app.main import create_app

PROMPT = "Alice lives in"


def scrape(http) -> dict[tuple[str, tuple], float]:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics(tiny_dir, tmp_path):
    with TestClient(create_app(tiny_settings(tiny_dir, tmp_path))) as http:
        wait_ready(http)
        client = Client(http=http)
        edit = client.wait(client.edit("Alice", "lives in", "Oslo")["id"], timeout=60)
        client.generate(PROMPT, max_new_tokens=4)
        list(client.stream(PROMPT, max_new_tokens=4))
        http.get("/edits/999999")
        metrics = scrape(http)
    assert metrics[("baft_queue_depth", ())] == 0
    assert metrics[("baft_queue_oldest_age_seconds", ())] == 0
    assert metrics[("baft_edits", (("status", "applied"),))] == 1
    assert metrics[("baft_edits", (("status", "queued"),))] == 0
    assert metrics[("baft_versions", ())] == 2 and metrics[("baft_head_version", ())] == edit["version"]
    assert metrics[("baft_edit_apply_seconds_count", (("kind", "edit"),))] == 1
    assert metrics[("baft_edit_apply_seconds_sum", (("kind", "edit"),))] > 0
    assert metrics[("baft_generation_seconds_count", ())] == 2
    assert metrics[("baft_generated_tokens_total", ())] >= 2
    assert metrics[("baft_generation_tokens_per_second_count", ())] == 2
    assert metrics[("baft_worker_up", ())] == 1 and metrics[("baft_worker_heartbeat_age_seconds", ())] < 30
    assert metrics[("baft_database_up", ())] == 1
    assert metrics[("baft_http_responses_total", (("code", "404"),))] == 1


def test_a_full_collection_walks_only_what_came_after_start_up(tiny_dir, tmp_path):
    """A full garbage collection holds the GIL while it walks every tracked object: unfrozen, the
    objects a process makes as it starts (model, tokenizer, modules) stalled every request of the
    process each time."""
    with TestClient(create_app(tiny_settings(tiny_dir, tmp_path))) as http:
        wait_ready(http)
        client = Client(http=http)
        client.wait(client.edit("Alice", "lives in", "Oslo")["id"], timeout=60)  # the worker prepared
        frozen, walked = gc.get_freeze_count(), len(gc.get_objects())
    assert walked < frozen / 4, (walked, frozen)


def test_queue_metrics_while_edits_wait(tmp_path):
    """Nothing applies (the model cannot load): depth and age of the oldest waiting edit grow."""
    settings = tiny_settings(tmp_path / "no-such-model", tmp_path)
    with TestClient(create_app(settings)) as http:
        wait_until(lambda: http.get("/ready").json()["checks"]["model"].startswith("FileNotFoundError"), 30)
        for _ in range(3):
            assert http.post("/edits", json={"subject": "A", "relation": "is in", "object": "B"}).status_code == 202
        wait_until(lambda: scrape(http)[("baft_queue_oldest_age_seconds", ())] > 0.2, 10)
        metrics = scrape(http)
    assert metrics[("baft_queue_depth", ())] == 3 and metrics[("baft_edits", (("status", "queued"),))] == 3
    assert metrics[("baft_worker_up", ())] == 0  # the worker never got as far as the lease


@pytest.mark.services
def test_ready_says_no_worker_holds_the_lease(tiny_dir, tmp_path, postgres_url, redis_url):
    stream = f"test-ready-{uuid.uuid4().hex[:8]}"
    with postgres_schema(postgres_url) as database:
        settings = tiny_settings(tiny_dir, tmp_path, database_url=database, redis_url=redis_url, redis_stream=stream)
        try:
            with TestClient(create_app(settings)) as http:
                wait_until(lambda: http.get("/ready").json()["checks"]["model"] == "ok", 60)
                ready = http.get("/ready")
                assert ready.status_code == 503
                assert ready.json()["checks"]["worker"].startswith("no worker holds the trainer lease")
                assert scrape(http)[("baft_worker_up", ())] == 0
        finally:
            redis.Redis.from_url(redis_url).delete(stream)


@pytest.mark.services
def test_replicas_share_checkpoints_through_the_database(tiny_dir, tmp_path, postgres_url):
    """Two API processes without Redis on one PostgreSQL, each with its own local directory (two
    machines): one trains, the other stands by and serves the versions the first made."""
    with postgres_schema(postgres_url) as database:
        common = dict(database_url=database, checkpoint_storage="database", lease_ttl_s=3, evaluate_on_apply=False)
        first = tiny_settings(tiny_dir, tmp_path / "a", **common)
        second = tiny_settings(tiny_dir, tmp_path / "b", **common)
        # one after the other: two model loads at once in one process race in transformers
        # (meta tensors); real replicas are separate processes
        with TestClient(create_app(first)) as a:
            wait_ready(a)
            with TestClient(create_app(second)) as b:
                wait_ready(b)
                for subject in ("Alice", "Bob"):  # a chain: base, the first edit's version, the second's
                    edit = Client(http=a).wait(Client(http=a).edit(subject, "lives in", "Oslo")["id"], timeout=60)
                sha256 = Client(http=a).version(edit["version"])["checkpoint_sha256"]
                texts = [Client(http=h).generate(PROMPT, max_new_tokens=4) for h in (a, b)]
                assert texts[0] == {**texts[1], "seconds": texts[0]["seconds"]}
                assert texts[0]["version"] == edit["version"]
                for side in (first, second):  # one wrote it, the other fetched it
                    assert (side.checkpoints_dir / sha256).is_dir()
        # a replica whose local copy is gone (a new machine) fetches it again
        shutil.rmtree(second.checkpoints_dir)
        with TestClient(create_app(second)) as b:
            wait_until(lambda: b.get("/ready").json()["checks"]["model"] == "ok", 60)
            assert Client(http=b).generate(PROMPT, max_new_tokens=4)["text"] == texts[0]["text"]
