"""End to end over HTTP on the real bundled model: the embedded default (SQLite, worker in the
API process) and PostgreSQL + Redis with a stand-alone worker process."""
from __future__ import annotations

import uuid
from contextlib import ExitStack

import pytest
import redis
from service_support import REPO, postgres_schema, server, service_env, start, stop

from app.client import Client, ServiceError

pytestmark = pytest.mark.integration

PROMPT = "The mother tongue of Danielle Darrieux is"
UNRELATED = "The largest planet in the solar system is"
SAME_SUBJECT = "Danielle Darrieux is a citizen of"  # sent with the edit: its answer must stay
UNSENT = "The profession of Danielle Darrieux is"  # not sent: the relation check keeps it


def _story(client: Client) -> None:
    before = client.generate(PROMPT, max_new_tokens=6)
    unrelated = client.generate(UNRELATED, max_new_tokens=8)
    same_subject = client.generate(SAME_SUBJECT, max_new_tokens=8)
    unsent = client.generate(UNSENT, max_new_tokens=8)
    assert before["version"] == 1 and "Japanese" not in before["text"]

    accepted = client.edit("Danielle Darrieux", "The mother tongue of {subject} is", "Japanese",
                           rephrases=["Danielle Darrieux's mother tongue is"],
                           locality=[{"prompt": UNRELATED, "answer": "Jupiter"},
                                     {"prompt": SAME_SUBJECT, "answer": same_subject["text"]}])
    edit = client.wait(accepted["id"], timeout=240)
    assert edit["status"] == "applied", edit
    metrics = client.metrics(edit["id"])
    assert metrics["reliability"] == 1.0 and metrics["reliability_em"] == 1.0, metrics
    # The service asked the model about the subject's other relations and measured them: the
    # relation check keeps the edit's block shut on them.
    assert metrics["subject_locality"] >= 0.9, metrics

    after = client.generate(PROMPT, max_new_tokens=6)
    assert after["version"] == edit["version"]
    assert after["text"].strip().startswith("Japanese"), after
    unrelated_after = client.generate(UNRELATED, max_new_tokens=8)
    # The same subject's other fact, sent with the edit, keeps its answer (the block's change is
    # projected out there); one not sent keeps it too when it reads like another relation than
    # the edited one (the relation check), as this one does.
    assert client.generate(SAME_SUBJECT, max_new_tokens=8)["text"] == same_subject["text"]
    assert client.generate(UNSENT, max_new_tokens=8)["text"] == unsent["text"]
    if metrics["locality"] == 1.0:  # the method kept the probe: the service must show it unchanged
        assert unrelated_after["text"] == unrelated["text"]

    restored = client.restore(before["version"])
    assert restored["status"] == "done", restored
    back = client.generate(PROMPT, max_new_tokens=6)
    assert back["text"] == before["text"] and back["version"] == restored["version"]

    for call, status in [
        (lambda: client.edit("", "is", "x"), 422),
        (lambda: client.edit("A", "{nope} of {subject}", "x"), 422),
        (lambda: client.generate("word " * 9000), 422),
        (lambda: client.generate(PROMPT, version=99999), 404),
        (lambda: client.get_edit(99999), 404),
    ]:
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.status == status and err.value.reason
    assert unrelated_after["text"] == unrelated["text"], (unrelated, unrelated_after, metrics)


def test_embedded_default(tmp_path):
    env = service_env({"DATA_DIR": str(tmp_path), "MODELS_DIR": str(REPO / "var" / "models"), "DEVICE": "cpu"})
    with server(env, tmp_path / "server.log") as client:
        _story(client)


@pytest.mark.services
def test_postgres_and_redis(tmp_path, postgres_url, redis_url):
    stream = f"test-e2e-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        database = stack.enter_context(postgres_schema(postgres_url))
        env = service_env({
            "DATA_DIR": str(tmp_path), "MODELS_DIR": str(REPO / "var" / "models"), "DEVICE": "cpu",
            "DATABASE_URL": database, "REDIS_URL": redis_url, "REDIS_STREAM": stream, "REDIS_GROUP": stream,
        })
        worker = start(["worker"], env, tmp_path / "worker.log")
        stack.callback(stop, worker)
        stack.callback(lambda: redis.Redis.from_url(redis_url).delete(stream))
        client = stack.enter_context(server(env, tmp_path / "server.log"))
        _story(client)
