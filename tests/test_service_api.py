"""The API in its embedded mode (SQLite, in-process worker) on the tiny model, in process."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from service_support import tiny_settings, wait_ready, wait_until

from app.client import Client, ServiceError
from app.main import create_app

EDIT = {"subject": "Danielle Darrieux", "relation": "The mother tongue of {subject} is", "object": "English"}
PROMPT = "The mother tongue of Danielle Darrieux is"


@pytest.fixture(scope="module")
def http(tiny_dir, tmp_path_factory):
    app = create_app(tiny_settings(tiny_dir, tmp_path_factory.mktemp("api-data")))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(http) -> Client:
    return Client(http=http)


def test_health_ready_and_base_version(http, client):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json()["checks"] == {"model": "ok", "database": "ok", "worker": "ok", "queue": "ok"}
    base = client.version(1)
    assert base["kind"] == "base" and base["parent"] is None and base["edit_count"] == 0
    assert len(base["checkpoint_sha256"]) == 64
    assert http.get("/openapi.json").status_code == 200 and http.get("/docs").status_code == 200


def test_edit_lifecycle_metrics_and_restore(client):
    before = client.generate(PROMPT, max_new_tokens=6)
    accepted = client.edit(**EDIT, rephrases=["Danielle Darrieux's mother tongue is"],
                           locality=[{"prompt": "The capital of France is", "answer": "Paris"}])
    assert accepted["status"] == "queued"
    edit = client.wait(accepted["id"], timeout=60)
    assert edit["status"] == "applied", edit
    assert edit["version"] > before["version"] and edit["train_seconds"] > 0
    assert edit["started_at"] and edit["finished_at"] and edit["queue_seconds"] >= 0

    version = client.version(edit["version"])
    assert version["edits"] == [edit["id"]] and version["kind"] == "edit"

    metrics = client.metrics(edit["id"])
    assert metrics["measured"] == "at_apply" and metrics["version"] == edit["version"]
    for name in ("reliability", "generality", "locality", "reliability_em", "generality_em"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["portability"] is None  # no portability probes given
    assert metrics["steps"] >= 1 and set(metrics["basis_weights"]) == {"1", "2"}

    again = client.metrics(edit["id"], version="current")
    assert again["measured"] == "remeasured"
    assert again["reliability"] == pytest.approx(metrics["reliability"])

    after = client.generate(PROMPT, max_new_tokens=6)
    assert after["version"] == edit["version"]
    old = client.generate(PROMPT, max_new_tokens=6, version=before["version"])
    assert old["text"] == before["text"] and old["version"] == before["version"]

    restored = client.restore(before["version"])
    assert restored["status"] == "done" and restored["restored_from"] == before["version"]
    record = client.version(restored["version"])
    assert record["kind"] == "restore" and record["parent"] == edit["version"]
    # The same state again: the restore shares the checkpoint of the version it restored.
    assert record["checkpoint_sha256"] == client.version(before["version"])["checkpoint_sha256"]
    now = client.generate(PROMPT, max_new_tokens=6)
    assert now["text"] == before["text"] and now["version"] == restored["version"]
    assert [v["id"] for v in client.versions()["items"]][-1] == restored["version"]


def test_stream_matches_generate(client):
    whole = client.generate(PROMPT, max_new_tokens=8)
    assert "".join(client.stream(PROMPT, max_new_tokens=8)) == whole["text"]


def test_sampling_is_reproducible_with_a_seed(client):
    a = client.generate(PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = client.generate(PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a["text"] == b["text"]


def test_batched_edits_share_one_version(client):
    edits = client.edits([
        {"subject": "Paris", "relation": "is the capital of", "object": "Italy", "mode": "batched"},
        {"subject": "Berlin", "relation": "is the capital of", "object": "Spain", "mode": "batched"},
    ])
    applied = [client.wait(e["id"], timeout=60) for e in edits]
    assert {e["status"] for e in applied} == {"applied"}
    assert applied[0]["version"] == applied[1]["version"]
    version = client.version(applied[0]["version"])
    assert version["kind"] == "batch" and version["edits"] == [e["id"] for e in edits]


def test_continual_edits_apply_in_order_one_version_each(client):
    ids = [client.edit(f"Person {i}", "was born in", f"City {i}")["id"] for i in range(3)]
    versions = [client.wait(i, timeout=60)["version"] for i in ids]
    assert versions == sorted(versions) and len(set(versions)) == 3
    for edit_id, version in zip(ids, versions):
        assert client.version(version)["edits"] == [edit_id]


def test_idempotency_key(client):
    first = client.edit("Rome", "is located in", "Peru", idempotency_key="retry-1")
    second = client.edit("Rome", "is located in", "Peru", idempotency_key="retry-1")
    assert first["id"] == second["id"]
    with pytest.raises(ServiceError) as err:
        client.edit("Rome", "is located in", "Chile", idempotency_key="retry-1")
    assert err.value.status == 409
    client.wait(first["id"])
    assert client.list_edits()["total"] == len({e["id"] for e in client.list_edits(limit=500)["items"]})


def test_list_edits_paging_and_filter(client):
    page = client.list_edits(limit=2)
    assert len(page["items"]) <= 2 and page["total"] >= len(page["items"])
    applied = client.list_edits(status="applied", limit=500)
    assert applied["items"] and all(e["status"] == "applied" for e in applied["items"])


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({**EDIT, "subject": ""}, "subject"),
        ({**EDIT, "subject": "   "}, "blank"),
        ({**EDIT, "object": ""}, "object"),
        ({**EDIT, "relation": "The {language} of {subject}"}, "template"),
        ({**EDIT, "relation": "{subject:>999999999}"}, "template"),
        ({**EDIT, "subject": "x" * 5000}, "subject"),
        ({**EDIT, "mode": "sometimes"}, "mode"),
        ({**EDIT, "extra": 1}, "extra"),
        ({"subject": "a", "relation": "b"}, "object"),
        ({**EDIT, "object": "word " * 190}, "context"),
        ([], "body"),
    ],
)
def test_bad_edits_are_422_with_a_reason(http, body, fragment):
    response = http.post("/edits", json=body)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["reason"] or fragment in response.text


def test_bad_generation_and_unknown_ids(http):
    assert http.post("/generate", json={"prompt": ""}).status_code == 422
    too_long = http.post("/generate", json={"prompt": "word " * 200})
    assert too_long.status_code == 422 and "context" in too_long.json()["reason"]
    assert http.post("/generate", json={"prompt": "hi", "max_new_tokens": 0}).status_code == 422
    assert http.post("/generate", json={"prompt": "hi", "top_p": 0}).status_code == 422
    assert http.post("/generate", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    for method, path in [
        ("GET", "/edits/999999"), ("GET", "/edits/999999/metrics"), ("GET", "/versions/999999"),
        ("POST", "/versions/999999/restore"),
    ]:
        response = http.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 404 and "does not exist" in response.json()["reason"]
    missing = http.post("/generate", json={"prompt": "hi", "version": 999999})
    assert missing.status_code == 404
    assert http.get("/edits/1/metrics", params={"version": "latest"}).status_code == 422


def test_edit_too_long_for_the_context_is_422(http):
    # Fits the character limits but not the tiny model's 128-token context once rephrased.
    response = http.post("/edits", json={**EDIT, "rephrases": ["word " * 150]})
    assert response.status_code == 422 and "context" in response.json()["reason"]


def test_internal_errors_are_500s_with_a_log_line(http, monkeypatch, caplog):
    """A ValueError from inside the service is a bug, not the client's: 500, logged; the
    request's own checks (InvalidRequest) stay 422 (400 on /v1)."""
    runtime = http.app.state.service.runtime

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(runtime, "stream", broken)
    with caplog.at_level("ERROR", logger="app"):
        response = http.post("/generate", json={"prompt": "hi"})
        completion = http.post("/v1/completions", json={"model": runtime.model_name, "prompt": "hi"})
    assert response.status_code == 500, response.text
    assert response.json() == {"reason": "internal error (logged on the server)"}
    assert "an internal bug" not in response.text
    assert any("POST /generate failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert completion.status_code == 500 and completion.json()["error"]["type"] == "server_error"
    assert "an internal bug" not in completion.text
    assert http.get("/metrics").status_code == 200
    monkeypatch.undo()
    too_long = http.post("/generate", json={"prompt": "hi", "max_new_tokens": 200})  # context: 128
    assert too_long.status_code == 422 and "context" in too_long.json()["reason"]
    too_long = http.post("/v1/completions", json={"model": runtime.model_name, "prompt": "hi", "max_tokens": 200})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]


def test_api_keys(tiny_dir, tmp_path):
    settings = tiny_settings(tiny_dir, tmp_path, api_keys="admin-key", read_api_keys="reader-key")
    with TestClient(create_app(settings)) as http:
        wait_ready(http)
        body = {"prompt": "Hello", "max_new_tokens": 2}
        assert http.post("/generate", json=body).status_code == 401
        assert http.post("/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/generate", json=body, headers={"Authorization": "Bearer reader-key"}).status_code == 200
        assert http.get("/versions", headers={"Authorization": "Bearer reader-key"}).status_code == 200
        denied = http.post("/edits", json=EDIT, headers={"Authorization": "Bearer reader-key"})
        assert denied.status_code == 403 and "read-only" in denied.json()["reason"]
        assert http.post("/edits", json=EDIT).status_code == 401
        assert http.post("/versions/1/restore", json={}, headers={"Authorization": "Bearer reader-key"}).status_code == 403
        ok = Client(http=http, api_key="admin-key").edit(**EDIT)
        assert ok["status"] == "queued"
        assert http.get("/health").status_code == 200  # probes stay open


def test_queued_edits_survive_a_restart(tiny_dir, tmp_path):
    """In-process mode is durable: the SQL rows are the queue. The first start cannot load its
    model, so nothing applies there; the edits wait for the second start."""
    broken = tiny_settings(tiny_dir, tmp_path, model=str(tmp_path / "no-such-model"))
    with TestClient(create_app(broken)) as http:
        wait_until(lambda: "model" in http.get("/ready").json()["checks"]
                   and http.get("/ready").json()["checks"]["model"].startswith("FileNotFoundError"), 30)
        assert http.post("/generate", json={"prompt": "Hi"}).status_code == 503
        good = http.post("/edits", json=EDIT)
        # No tokenizer yet, so this one is only caught by the worker, which fails it with the reason.
        too_long = http.post("/edits", json={**EDIT, "object": "word " * 180})
        assert good.status_code == too_long.status_code == 202
        assert http.get(f"/edits/{good.json()['id']}").json()["status"] == "queued"
    with TestClient(create_app(tiny_settings(tiny_dir, tmp_path))) as http:
        wait_ready(http)
        client = Client(http=http)
        edit = client.wait(good.json()["id"], timeout=60)
        assert edit["status"] == "applied" and client.version(edit["version"])["edits"] == [edit["id"]]
        failed = client.wait(too_long.json()["id"], timeout=60)
        assert failed["status"] == "failed" and "context" in failed["error"]
        with pytest.raises(ServiceError) as err:
            client.metrics(failed["id"])
        assert err.value.status == 409 and "failed" in err.value.reason
