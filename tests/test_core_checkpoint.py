"""Adapter checkpoints: exact round trip, content hash, corruption and base-model checks."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from baft_core import EditConfig, Editor, EditRequest
from baft_core.checkpoint import ADAPTER_FILE, MANIFEST_FILE, CheckpointError, load_checkpoint

PROMPTS = ["The mother tongue of Danielle Darrieux is", "The capital of France is", "Hi"]


@pytest.fixture(scope="module")
def edited(tiny_sharp):
    torch.manual_seed(0)
    config = EditConfig(max_steps=20, rank=6, lr=0.05)
    editor = Editor(tiny_sharp.model, tiny_sharp.tokenizer, config, unrelated_prompts=PROMPTS[1:2])
    editor.edit(
        EditRequest(
            PROMPTS[0],
            "Japanese",
            subject="Danielle Darrieux",
            rephrases=["Danielle Darrieux speaks"],
            locality=[{"prompt": "The capital of France is", "answer": "Paris"}],
        )
    )
    yield editor
    editor.attachment.detach()


def test_round_trip_reproduces_generations(tiny_sharp, edited, tmp_path):
    manifest = edited.save(tmp_path / "ckpt", base_model=tiny_sharp.identity)
    assert manifest["sha256"] == hashlib.sha256((tmp_path / "ckpt" / ADAPTER_FILE).read_bytes()).hexdigest()
    on_disk = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())
    assert on_disk["sha256"] == manifest["sha256"]
    assert on_disk["edits"] == 1 and on_disk["layers"] == edited.layers and on_disk["rank"] == 6

    expected = edited.generate(PROMPTS, 8)
    assert expected != edited.generate(PROMPTS, 8, edited=False)  # the edit is visible

    fresh = Editor(tiny_sharp.model, tiny_sharp.tokenizer, EditConfig(rank=6), unrelated_prompts=[])
    try:
        assert fresh.generate(PROMPTS, 8) != expected
        loaded_manifest = fresh.load(tmp_path / "ckpt", base_model=tiny_sharp.identity)
        assert loaded_manifest["sha256"] == manifest["sha256"]
        assert fresh.generate(PROMPTS, 8) == expected
        assert fresh.history == edited.history
        assert fresh.history[0].locality[0].answer == "Paris"
        assert fresh.interventions.sealed_blocks == edited.interventions.sealed_blocks == 1
        for key, value in edited.interventions.state_dict().items():
            assert torch.equal(fresh.interventions.state_dict()[key], value), key
    finally:
        fresh.attachment.detach()


def test_identical_states_identical_hash(tiny_sharp, edited, tmp_path):
    a = edited.save(tmp_path / "a", base_model=tiny_sharp.identity)
    b = edited.save(tmp_path / "b", base_model=tiny_sharp.identity)
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / ADAPTER_FILE).read_bytes() == (tmp_path / "b" / ADAPTER_FILE).read_bytes()
    # re-saving a loaded state gives the same content hash
    checkpoint = load_checkpoint(tmp_path / "a", tiny_sharp.identity)
    from baft_core.checkpoint import save_checkpoint

    c = save_checkpoint(tmp_path / "c", checkpoint.interventions, checkpoint.config, tiny_sharp.identity,
                        checkpoint.history)
    assert c["sha256"] == a["sha256"]
    # a different state gives a different hash
    other = edited.new_interventions()
    d = save_checkpoint(tmp_path / "d", other, edited.config, tiny_sharp.identity, edited.history)
    assert d["sha256"] != a["sha256"]


def test_corrupted_adapter_raises(tiny_sharp, edited, tmp_path):
    edited.save(tmp_path / "ckpt", base_model=tiny_sharp.identity)
    path = tmp_path / "ckpt" / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError):
        edited.load(tmp_path / "ckpt")


def test_corrupt_manifest_and_missing_files_raise(tiny_sharp, edited, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    edited.save(tmp_path / "ckpt", base_model=tiny_sharp.identity)
    (tmp_path / "ckpt" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ckpt")


def test_other_base_model_raises(tiny_sharp, tiny, edited, tmp_path):
    edited.save(tmp_path / "ckpt", base_model=tiny_sharp.identity)
    assert tiny.identity != tiny_sharp.identity  # the identity tells the weights apart
    with pytest.raises(CheckpointError, match="base model"):
        load_checkpoint(tmp_path / "ckpt", base_model=tiny.identity)
    before = edited.interventions
    with pytest.raises(CheckpointError, match="base model"):
        edited.load(tmp_path / "ckpt", base_model="some-other-model")
    assert edited.interventions is before  # nothing was swapped in


def test_other_layers_raise(tiny_sharp, edited, tmp_path):
    edited.save(tmp_path / "ckpt", base_model=tiny_sharp.identity)
    other = Editor(tiny_sharp.model, tiny_sharp.tokenizer, EditConfig(layers=[0], rank=6), unrelated_prompts=[])
    try:
        with pytest.raises(CheckpointError, match="layers"):
            other.load(tmp_path / "ckpt", base_model=tiny_sharp.identity)
    finally:
        other.attachment.detach()
