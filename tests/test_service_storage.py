"""Storage of versions: each version's checkpoint names its parent's and holds only what it adds,
loads from disk to the adapter the trainer held, and restores exactly."""
from __future__ import annotations

import json

import torch
from fastapi.testclient import TestClient
from service_support import tiny_settings, wait_ready

from app.audit import audit
from app.client import Client
from app.main import create_app
from app.store import CheckpointStore
from baft_core.checkpoint import ADAPTER_FILE, read_metadata

PROMPT = "Bob lives in"


def test_versions_store_what_they_add_and_restore_exactly(tiny_dir, tmp_path):
    settings = tiny_settings(tiny_dir, tmp_path, evaluate_on_apply=False)
    with TestClient(create_app(settings)) as http:
        wait_ready(http)
        client = Client(http=http)
        versions = [client.version(1)]
        for subject, place in (("Alice", "Oslo"), ("Bob", "Lima"), ("Carol", "Rome")):
            edit = client.wait(client.edit(subject, "lives in", place)["id"], timeout=60)
            versions.append(client.version(edit["version"]))
        texts = [client.generate(PROMPT, max_new_tokens=4, version=v["id"])["text"] for v in versions]
        adapters = [settings.checkpoints_dir / v["checkpoint_sha256"] / ADAPTER_FILE for v in versions]
        for parent, adapter in zip(versions, adapters[1:]):
            metadata = read_metadata(adapter)
            assert metadata["parent"] == parent["checkpoint_sha256"]
            assert len(json.loads(metadata["history"])) == 1 and len(json.loads(metadata["segments"])) == 1
            assert "draw" in metadata  # the fresh block after the seal: its draw, not its values
        # The first edit also stores the standardisations it calibrated; then each version costs
        # what the one before did, whatever the number of edits before it.
        sizes = [a.stat().st_size for a in adapters]
        assert abs(sizes[3] - sizes[2]) < 100

        runtime = http.app.state.service.runtime
        on_disk = CheckpointStore(settings.checkpoints_dir, runtime.identity, "cpu")  # nothing cached
        for version in versions:
            held = runtime.store.load(version["checkpoint_sha256"])  # the state the trainer made
            loaded = on_disk.load(version["checkpoint_sha256"])
            a, b = held.interventions.state_dict(), loaded.interventions.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert loaded.history == held.history

        assert client.restore(versions[1]["id"])["status"] == "done"  # before Bob's edit
        assert client.generate(PROMPT, max_new_tokens=4)["text"] == texts[1] != texts[3]
        edit = client.wait(client.edit("Dan", "lives in", "Kyiv")["id"], timeout=60)
        after = read_metadata(settings.checkpoints_dir / client.version(edit["version"])["checkpoint_sha256"] / ADAPTER_FILE)
        assert after["parent"] == versions[1]["checkpoint_sha256"]  # the restored state, extended
        with runtime.session() as session:
            report = audit(session, settings.checkpoints_dir)
        assert report["ok"], report["problems"]
