"""Faults that once stopped the service: a restore that cannot be carried out, a current version
whose checkpoint is gone bad, torn files found on disk where a checkpoint is written again."""
from __future__ import annotations

import hashlib

from fastapi.testclient import TestClient
from service_support import TINY_EDIT_CONFIG, tiny_settings, wait_ready, wait_until
from sqlalchemy.exc import OperationalError

from app import crud
from app.api.routes import versions
from app.client import Client, ServiceError
from app.main import create_app
from app.models import Restore
from app.store import CheckpointStore
from baft_core import EditConfig, Editor, EditRequest
from baft_core.checkpoint import ADAPTER_FILE, SEGMENTS_DIR

PROMPT = "Alice lives in"


def _trained_editor(tiny, layers: list[int]) -> Editor:
    editor = Editor(tiny.model, tiny.tokenizer, EditConfig.from_dict({**TINY_EDIT_CONFIG, "layers": layers}))
    editor.edit(EditRequest.from_triple("Alice", "lives in", "Oslo"))
    return editor


def test_a_restore_that_cannot_be_done_fails_and_the_log_moves_on(tiny_dir, tiny, tmp_path):
    """A version whose adapter edits other layers (say, from a deployment with another config)
    loads but cannot be swapped in: the restore fails with the reason instead of staying queued
    in front of every later edit."""
    settings = tiny_settings(tiny_dir, tmp_path, evaluate_on_apply=False)
    with TestClient(create_app(settings)) as http:
        wait_ready(http)
        runtime = http.app.state.service.runtime
        foreign = _trained_editor(tiny, layers=[0, 3])
        sha256, path = CheckpointStore(settings.checkpoints_dir, runtime.identity, "cpu").save(foreign)
        foreign.attachment.detach()  # the session's tiny model serves other tests
        with runtime.session() as session:
            crud.ensure_checkpoint(session, sha256, str(path), 1)
            stray = crud.new_version(session, "edit", sha256, 1, None)
            session.commit()
        client = Client(http=http)
        try:
            client.restore(stray.id)
            raise AssertionError("the restore should have failed")
        except ServiceError as err:
            assert err.status == 409 and "layers" in err.reason, err.reason
        edit = client.wait(client.edit("Bob", "lives in", "Lima")["id"], timeout=60)
        assert edit["status"] == "applied" and edit["in_current_version"]
        assert client.restore(1)["status"] == "done"


def test_a_restore_accepted_while_the_database_fails_is_answered_202(tiny_dir, tmp_path, monkeypatch):
    """Once the restore row is committed the restore is accepted: if its status cannot be read
    while the request waits for it (the database restarting), the answer is 202 with its id, not
    a 503 that would have the client send the restore again."""
    settings = tiny_settings(tiny_dir, tmp_path, evaluate_on_apply=False)
    with TestClient(create_app(settings)) as http:
        wait_ready(http)
        client = Client(http=http)
        client.wait(client.edit("Alice", "lives in", "Oslo")["id"], timeout=60)

        def unreachable(*_):
            raise OperationalError("SELECT restores", {}, Exception("server closed the connection"))

        monkeypatch.setattr(versions, "_get_restore", unreachable)
        response = http.post("/versions/1/restore", json={})
        assert response.status_code == 202, response.text
        restore_id = response.json()["restore_id"]
        monkeypatch.undo()
        wait_until(lambda: http.get(f"/restores/{restore_id}").json()["status"] == "done", 60, what="the restore")
        with http.app.state.service.runtime.session() as session:
            assert session.query(Restore).count() == 1


def test_an_unloadable_current_version_does_not_take_the_service_down(tiny_dir, tmp_path):
    settings = tiny_settings(tiny_dir, tmp_path, evaluate_on_apply=False)
    with TestClient(create_app(settings)) as http:
        wait_ready(http)
        client = Client(http=http)
        edit = client.wait(client.edit("Alice", "lives in", "Oslo")["id"], timeout=60)
        head = client.version(edit["version"])
    # the head's adapter file is torn (a disk fault; with fsync a power loss no longer does this)
    adapter = settings.checkpoints_dir / head["checkpoint_sha256"] / ADAPTER_FILE
    adapter.write_bytes(adapter.read_bytes()[:100])
    with TestClient(create_app(settings)) as http:
        wait_ready(http)  # up, with the worker holding the lease
        client = Client(http=http)
        response = http.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
        assert response.status_code == 503 and "restore a version" in response.json()["reason"]
        assert response.headers["Retry-After"]
        assert client.generate(PROMPT, max_new_tokens=2, version=1)["version"] == 1  # others still serve
        waiting = client.edit("Bob", "lives in", "Lima")["id"]
        restored = client.restore(1)  # the way out: taken ahead of the edit that cannot apply yet
        assert restored["status"] == "done"
        after = client.wait(waiting, timeout=60)
        assert after["status"] == "applied" and after["version"] > restored["version"]
        assert client.generate(PROMPT, max_new_tokens=2)["version"] == after["version"]


def test_torn_files_are_not_reused_when_a_checkpoint_is_written_again(tiny, tmp_path):
    editor = _trained_editor(tiny, layers=[1, 2])
    sha256, path = CheckpointStore(tmp_path, "tiny", "cpu").save(editor)
    editor.attachment.detach()
    segments = sorted((tmp_path / SEGMENTS_DIR).glob("*.safetensors"))
    assert segments, "an edit seals a block"
    for file in [*segments, path / ADAPTER_FILE]:
        file.write_bytes(file.read_bytes()[:50])  # torn by a crash before this change's fsync
    again, _ = CheckpointStore(tmp_path, "tiny", "cpu").save(editor)  # a fresh process
    assert again == sha256
    for file in segments:
        assert hashlib.sha256(file.read_bytes()).hexdigest() == file.stem
    assert hashlib.sha256((path / ADAPTER_FILE).read_bytes()).hexdigest() == sha256
    loaded = CheckpointStore(tmp_path, "tiny", "cpu").load(sha256)
    assert len(loaded.history) == 1
