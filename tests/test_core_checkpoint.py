"""Adapter checkpoints: exact round trip, content hash, corruption and base-model checks."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from checkpoint_support import rewrite_adapter
from safetensors import safe_open
from safetensors.torch import load, save

from baft_core import EditConfig, Editor, EditRequest
from baft_core.checkpoint import (
    ADAPTER_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SEGMENTS_DIR,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)

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


def _save_in(root, editor, identity, parent=None) -> Checkpoint:
    """Saves into root/<sha256>/, as the service's store lays checkpoints out, and loads it back."""
    staging = root / "staging"
    manifest = save_checkpoint(
        staging, editor.interventions, editor.config, identity, editor.history, root / SEGMENTS_DIR, parent
    )
    staging.rename(root / manifest["sha256"])
    return load_checkpoint(root / manifest["sha256"], identity, segments=root / SEGMENTS_DIR)


def _states_equal(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_a_chain_of_checkpoints_loads_byte_for_byte(tiny_sharp, tmp_path):
    """Each version names its parent and holds only what it adds (one history entry, one segment,
    the fresh block as its draw), loads to the very adapter that was saved, and saves again to the
    same bytes as the whole state saved at once; an old version restores exactly."""
    config = EditConfig(max_steps=5, rank=6, sealed_rank=3)  # blocks sealed as their strongest directions
    editor = Editor(tiny_sharp.model, tiny_sharp.tokenizer, config, unrelated_prompts=PROMPTS[1:2])
    identity = tiny_sharp.identity
    try:
        chain = [_save_in(tmp_path, editor, identity)]
        states = [editor.interventions]
        for subject, target in (("Danielle Darrieux", "Japanese"), ("Toko Yasuda", "piano")):
            editor.edit(EditRequest.from_triple(subject, "The mother tongue of {subject} is", target))
            chain.append(_save_in(tmp_path, editor, identity, chain[-1]))
            states.append(editor.interventions)  # each edit publishes a new adapter object
        for checkpoint, state in zip(chain, states):
            assert _states_equal(checkpoint.interventions, state)
            assert torch.equal(checkpoint.interventions.draw_state, state.draw_state)
        head = read_metadata(tmp_path / chain[2].manifest["sha256"] / ADAPTER_FILE)
        assert head["parent"] == chain[1].manifest["sha256"]
        assert len(json.loads(head["history"])) == 1 and len(json.loads(head["segments"])) == 1
        assert "draw" in head and chain[2].history == editor.history
        whole = save_checkpoint(tmp_path / "whole", editor.interventions, editor.config, identity, editor.history)
        again = save_checkpoint(tmp_path / "again", chain[2].interventions, chain[2].config, identity, chain[2].history)
        assert whole["sha256"] == again["sha256"]
        # the version before, loaded afresh (nothing cached), is the state it was
        editor.load(tmp_path / chain[1].manifest["sha256"], identity, segments=tmp_path / SEGMENTS_DIR)
        assert _states_equal(editor.interventions, states[1]) and editor.history == chain[1].history
    finally:
        editor.attachment.detach()


def test_a_history_replayed_through_a_reload_gives_the_same_adapter(tiny_sharp, tmp_path):
    """Edits applied by an editor that was saved and reloaded halfway (a restart, a takeover, a
    restore) give the very adapter of one editor that applied them all in memory, so that the
    edit log replays bit for bit; and the global generator's use in between changes nothing."""
    config = EditConfig(max_steps=5, rank=6, sealed_rank=3)
    requests = [
        EditRequest.from_triple(subject, "The mother tongue of {subject} is", target)
        for subject, target in (("Danielle Darrieux", "Japanese"), ("Toko Yasuda", "piano"), ("Jan Smuts", "Dutch"))
    ]

    def fresh() -> Editor:
        return Editor(tiny_sharp.model, tiny_sharp.tokenizer, config, unrelated_prompts=PROMPTS[1:2])

    in_memory, first, second = fresh(), fresh(), None
    try:
        for request in requests:
            in_memory.edit(request)
        first.edit(requests[0])
        halfway = _save_in(tmp_path, first, tiny_sharp.identity)
        first.attachment.detach()
        torch.rand(1000)  # e.g. sampled generation in between
        second = fresh()
        second.load(tmp_path / halfway.manifest["sha256"], tiny_sharp.identity, segments=tmp_path / SEGMENTS_DIR)
        for request in requests[1:]:
            second.edit(request)
        assert _states_equal(second.interventions, in_memory.interventions)
        assert second.history == in_memory.history
    finally:
        in_memory.attachment.detach()
        if second is not None:
            second.attachment.detach()


def test_a_block_holding_edits_is_stored_whole(tiny_sharp, tmp_path):
    editor = Editor(tiny_sharp.model, tiny_sharp.tokenizer, EditConfig(max_steps=5, rank=6, block_edits=2), unrelated_prompts=[])
    try:
        base = _save_in(tmp_path, editor, tiny_sharp.identity)
        editor.edit(EditRequest.from_triple("Danielle Darrieux", "The mother tongue of {subject} is", "Japanese"))
        assert editor.interventions.sealed_blocks == 0  # the edit is in the trainable block
        child = _save_in(tmp_path, editor, tiny_sharp.identity, base)
        assert "draw" not in read_metadata(tmp_path / child.manifest["sha256"] / ADAPTER_FILE)
        assert _states_equal(child.interventions, editor.interventions)
    finally:
        editor.attachment.detach()


def test_format_5_checkpoints_still_load(tiny_sharp, edited, tmp_path):
    """Format 5 held the whole state in each file: the trainable block's values, no draw."""

    def format_5(metadata, tensors):
        for key in ("draw", "edits", "sealed_blocks"):
            metadata.pop(key)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("draw.")}
        tensors.update({k: v.detach() for k, v in edited.interventions.by_layer.named_parameters(prefix="by_layer")})
        return {**metadata, "format_version": "5"}, tensors

    edited.save(tmp_path, tiny_sharp.identity)
    rewrite_adapter(tmp_path, format_5)
    loaded = load_checkpoint(tmp_path, tiny_sharp.identity)
    assert _states_equal(loaded.interventions, edited.interventions) and loaded.history == edited.history
    assert loaded.interventions.draw_state is None  # so its next save stores the block whole


def test_a_broken_lineage_is_refused(tiny_sharp, edited, tmp_path):
    base = _save_in(tmp_path, edited, tiny_sharp.identity)
    edited.interventions.segment_ids.clear()  # the next save finds them again
    child = save_checkpoint(tmp_path / "child", edited.interventions, edited.config, tiny_sharp.identity,
                            edited.history + edited.history, tmp_path / SEGMENTS_DIR, base)
    assert child["parent"] == base.manifest["sha256"]
    parent = tmp_path / base.manifest["sha256"] / ADAPTER_FILE
    data = bytearray(parent.read_bytes())
    data[-1] ^= 0x01
    parent.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="parent checkpoint .* is corrupt"):
        load_checkpoint(tmp_path / "child", segments=tmp_path / SEGMENTS_DIR)
    parent.unlink()
    with pytest.raises(CheckpointError, match="parent checkpoint .* is missing"):
        load_checkpoint(tmp_path / "child", segments=tmp_path / SEGMENTS_DIR)
    with pytest.raises(CheckpointError, match="does not extend"):
        save_checkpoint(tmp_path / "other", edited.interventions, edited.config, tiny_sharp.identity, [],
                        tmp_path / SEGMENTS_DIR, base)


def safetensors_keys(path) -> set[str]:
    with safe_open(path, framework="pt") as handle:
        return set(handle.keys())


def test_blocks_without_gates_keep_no_gate_rows(tiny_sharp, edited, tmp_path):
    """Routed blocks act without their gates by default: nothing reads a sealed gate, so neither
    memory nor segments hold one, and segments written when they did still load."""
    sealed = edited.interventions.sealed[str(edited.layers[0])]
    assert not sealed.use_gates and sealed.num_bases == edited.config.rank
    assert sealed.gate_weight.shape[0] == 0 and sealed.gate_bias.shape[0] == 0
    edited.save(tmp_path, tiny_sharp.identity)
    metadata = read_metadata(tmp_path / ADAPTER_FILE)
    (segment_id,) = json.loads(metadata["segments"])
    held = safetensors_keys(tmp_path / SEGMENTS_DIR / f"{segment_id}.safetensors")
    assert f"{edited.layers[0]}.rotation" in held and not any("gate" in key for key in held)

    def with_gate_rows(metadata, tensors):  # as segments were written before
        path = tmp_path / SEGMENTS_DIR / f"{segment_id}.safetensors"
        rows = load(path.read_bytes())
        for layer in edited.layers:
            rows[f"{layer}.gate_weight"] = torch.randn(edited.config.rank, sealed.hidden_size)
            rows[f"{layer}.gate_bias"] = torch.randn(edited.config.rank)
        data = save(rows)
        old_id = hashlib.sha256(data).hexdigest()
        (tmp_path / SEGMENTS_DIR / f"{old_id}.safetensors").write_bytes(data)
        kept = {k: v for k, v in metadata.items() if k != "segment_crc32"}
        return {**kept, "segments": json.dumps([old_id])}, tensors

    rewrite_adapter(tmp_path, with_gate_rows)
    loaded = load_checkpoint(tmp_path, tiny_sharp.identity)
    assert _states_equal(loaded.interventions, edited.interventions)
    assert loaded.interventions.sealed[str(edited.layers[0])].gate_weight.shape[0] == 0


def test_format_7_checkpoints_still_load(tiny_sharp, edited, tmp_path):
    """Before format 8 a sealed basis held A and b ("source_weight", "source_bias") and every
    block kept all its bases: they load as C = A - R, and the adapter answers as before."""
    prompts = [PROMPTS[0], "Danielle Darrieux speaks"]
    expected = edited.generate(prompts, max_new_tokens=6)
    edited.save(tmp_path, tiny_sharp.identity)

    def format_7(metadata, tensors):
        (segment_id,) = json.loads(metadata["segments"])
        rows = load((tmp_path / SEGMENTS_DIR / f"{segment_id}.safetensors").read_bytes())
        rows = {k: v.float() if v.is_floating_point() else v for k, v in rows.items()}  # fp32 before format 10
        for layer in edited.layers:
            rows[f"{layer}.source_weight"] = rows.pop(f"{layer}.change_weight") + rows[f"{layer}.rotation"]
            rows[f"{layer}.source_bias"] = rows.pop(f"{layer}.change_bias")
        data = save(rows)
        old_id = hashlib.sha256(data).hexdigest()
        (tmp_path / SEGMENTS_DIR / f"{old_id}.safetensors").write_bytes(data)
        config = {k: v for k, v in json.loads(metadata["config"]).items() if k != "sealed_rank"}
        kept = {k: v for k, v in metadata.items() if k != "segment_crc32"}
        return {**kept, "config": json.dumps(config), "segments": json.dumps([old_id]), "format_version": "7"}, tensors

    rewrite_adapter(tmp_path, format_7)
    loaded = load_checkpoint(tmp_path, tiny_sharp.identity)
    assert loaded.config.sealed_rank is None and loaded.interventions.sealed_blocks == 1
    for layer in edited.layers:
        old, new = edited.interventions.sealed[str(layer)], loaded.interventions.sealed[str(layer)]
        assert torch.equal(old.rotation, new.rotation)
        assert torch.allclose(old.change_weight, new.change_weight, atol=1e-6)
    original = edited.interventions
    try:
        edited.load_state(loaded.interventions, loaded.history)
        assert edited.generate(prompts, max_new_tokens=6) == expected
    finally:
        edited.load_state(original, loaded.history)


def test_format_8_route_keys_read_their_last_token_alone(tiny_sharp, edited, tmp_path):
    """Before format 9 a route key held its subject's last token only: such keys load reading that
    token alone (and the adapter's config makes new keys so too), and the edit still holds."""
    expected = edited.generate([PROMPTS[0]], max_new_tokens=6)
    edited.save(tmp_path, tiny_sharp.identity)
    newer = ("route_key_tokens", "route_key_prefixes", "route_prefixes")

    def format_8(metadata, tensors):
        (segment_id,) = json.loads(metadata["segments"])
        rows = load((tmp_path / SEGMENTS_DIR / f"{segment_id}.safetensors").read_bytes())
        data = save({k: v for k, v in rows.items() if k not in newer})
        old_id = hashlib.sha256(data).hexdigest()
        (tmp_path / SEGMENTS_DIR / f"{old_id}.safetensors").write_bytes(data)
        config = {k: v for k, v in json.loads(metadata["config"]).items() if not k.startswith("route_")}
        kept = {k: v for k, v in metadata.items() if k != "segment_crc32"}
        own = {k: v for k, v in tensors.items() if k.split(".")[-1] not in ("pending_tokens", "pending_prefix", "pending_prefixes", "prefix_threshold")}
        return {**kept, "config": json.dumps(config), "segments": json.dumps([old_id]), "format_version": "8"}, own

    rewrite_adapter(tmp_path, format_8)
    loaded = load_checkpoint(tmp_path, tiny_sharp.identity)
    router = loaded.interventions.router
    assert loaded.config.route_tokens == 1 and router.subject_tokens == 1
    assert router.key_tokens.tolist() == [1] * len(router.keys) and (router.key_prefix == -1).all()
    original = edited.interventions
    try:
        edited.load_state(loaded.interventions, loaded.history)
        assert edited.generate([PROMPTS[0]], max_new_tokens=6) == expected
    finally:
        edited.load_state(original, loaded.history)


def test_format_10_fp16_relation_states_load_as_a_seal_makes_them(tiny_sharp, edited, tmp_path):
    """Before format 11 a block's relation states were fp16 unit rows: they load quantised to
    int8 with a scale a row, and a save into another directory writes the block anew."""
    expected = edited.generate(PROMPTS[:2], max_new_tokens=6)
    edited.save(tmp_path, tiny_sharp.identity)
    relations = edited.interventions.relations
    assert len(relations.probes) and relations.probes.dtype == torch.int8

    def format_10(metadata, tensors):
        (segment_id,) = json.loads(metadata["segments"])
        rows = load((tmp_path / SEGMENTS_DIR / f"{segment_id}.safetensors").read_bytes())
        for name in ("relation_key", "relation_probe"):
            scale = rows.pop(f"{name}_scales")
            rows[f"{name}s"] = (rows[f"{name}s"].float() * scale[:, None]).half()
        data = save(rows)
        old_id = hashlib.sha256(data).hexdigest()
        (tmp_path / SEGMENTS_DIR / f"{old_id}.safetensors").write_bytes(data)
        kept = {k: v for k, v in metadata.items() if k != "segment_crc32"}
        return {**kept, "segments": json.dumps([old_id]), "format_version": "10"}, tensors

    rewrite_adapter(tmp_path, format_10)
    loaded = load_checkpoint(tmp_path, tiny_sharp.identity)
    old = loaded.interventions.relations
    assert old.probes.dtype == torch.int8 and old.probes.shape == relations.probes.shape
    assert (old.probes.int() - relations.probes.int()).abs().max() <= 1
    assert torch.allclose(old.probe_scale, relations.probe_scale, rtol=1e-3)
    original = edited.interventions
    try:
        edited.load_state(loaded.interventions, loaded.history)
        assert edited.generate(PROMPTS[:2], max_new_tokens=6) == expected
        resaved = edited.save(tmp_path / "again", tiny_sharp.identity)
        assert resaved["format_version"] == FORMAT_VERSION
        again = load_checkpoint(tmp_path / "again", tiny_sharp.identity).interventions.relations
        assert torch.equal(again.probes, old.probes) and torch.equal(again.probe_scale, old.probe_scale)
    finally:
        edited.load_state(original, loaded.history)
