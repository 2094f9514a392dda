"""Capacity in fixed-size blocks: sealing, the exact cutoff, sparse evaluation, replay within the
trainable block, the sample of sealed edits used as negatives, and checkpoints of sealed state."""
from __future__ import annotations

import copy

import torch
from test_core_editor import make_editor

from baft_core import EditConfig, EditRequest
from baft_core.blocks import SealedBases
from baft_core.intervention import BasisIntervention, standardize

EDITS = [
    EditRequest("The mother tongue of Danielle Darrieux is", "Japanese"),
    EditRequest("The capital of Norway is", "Lima"),
    EditRequest("Apple's chief executive is", "Ada Lovelace"),
    EditRequest("The Eiffel Tower stands in", "Rome"),
]


def gate_inputs(h: torch.Tensor) -> torch.Tensor:
    """A fresh block's standardisation (center 0, scale 1)."""
    return standardize(h, torch.zeros(h.shape[-1]), torch.ones(h.shape[-1]))


def dense_delta(sealed: SealedBases, h: torch.Tensor) -> torch.Tensor:
    """The formula over every sealed basis, without skipping closed ones."""
    w = sealed.weights(gate_inputs(h))
    coordinates = h @ sealed.change_weight.T + sealed.change_bias
    return (coordinates * w) @ sealed.rotation


def random_block(d: int, rank: int, bias: float) -> BasisIntervention:
    block = BasisIntervention(d, rank)
    with torch.no_grad():
        block.source.weight.normal_()
        block.source.bias.normal_()
        block.gate.weight.normal_(std=2.0)
        block.gate.bias.fill_(bias)
    return block


def test_sealed_bases_skip_closed_gates_exactly():
    torch.manual_seed(0)
    sealed = SealedBases(16, cutoff=0.1)
    for bias in (-1.0, -4.0, 0.0):
        sealed.append(random_block(16, 3, bias))
    assert sealed.num_bases == 9
    h = torch.randn(50, 16)
    delta, w = sealed(h, gate_inputs(h))
    assert torch.allclose(delta, dense_delta(sealed, h), atol=1e-5)
    assert ((w == 0) | (w > 0.1)).all()  # below the cutoff a gate is exactly off
    assert (w == 0).any() and (w > 0).any()


def test_all_gates_below_cutoff_leave_h_unchanged():
    sealed = SealedBases(16, cutoff=0.01)
    sealed.append(random_block(16, 4, bias=-50.0))
    h = torch.randn(7, 16)
    delta, w = sealed(h, gate_inputs(h))
    assert torch.equal(delta, torch.zeros_like(h)) and torch.equal(w, torch.zeros_like(w))


def test_blocks_seal_when_full_and_stay_frozen(tiny_sharp):
    ed = make_editor(tiny_sharp, block_edits=2, replay_size=8)
    try:
        interventions = ed.interventions
        ed.edit(EDITS[0])
        assert ed.interventions.sealed_blocks == 0 and int(ed.interventions.edit_count) == 1
        ed.edit(EDITS[1])
        assert ed.interventions.sealed_blocks == 1 and int(ed.interventions.edit_count) == 0
        frozen = {k: v.clone() for k, v in ed.interventions.sealed.state_dict().items()}
        # A sealed block is not trained again, and the fresh block starts as the identity.
        fresh = ed.interventions[ed.layers[0]]
        assert torch.equal(fresh.source.weight, fresh.R) and not fresh.source.bias.any()
        ed.edit(EDITS[2])
        ed.edit(EDITS[3])
        assert ed.interventions.sealed_blocks == 2
        after = ed.interventions.sealed.state_dict()
        for key, value in frozen.items():
            if value.dim() and value.shape[0] == 2 * ed.config.rank:  # per-basis rows
                assert torch.equal(after[key][: value.shape[0]], value), key
        # The adapter published before the edits is untouched (sealing never writes in place).
        assert interventions.sealed_blocks == 0
        assert ed.interventions.num_parameters() > interventions.num_parameters()
    finally:
        ed.attachment.detach()


def test_a_sealed_block_does_what_was_trained(tiny_sharp):
    """With its gates, the block is fitted under the gates it is sealed with: the cutoff and the
    gate polish change nothing once it is sealed."""
    from test_core_editor import first_loss

    ed = make_editor(tiny_sharp, block_edits=1, sealed_gates=True)
    try:
        result = ed.edit(EDITS[0])
        assert ed.interventions.sealed_blocks == 1
        assert abs(first_loss(ed, EDITS[0]) - result.losses["ce_sealed"]) < 1e-3
    finally:
        ed.attachment.detach()


def test_a_routed_block_is_trained_as_it_acts(tiny_sharp):
    """Without sealed gates the block is trained with every gate at 1, which is how it acts once
    sealed on the prompts routed to it: no gate terms, and the edit's loss is unchanged."""
    from test_core_editor import first_loss

    ed = make_editor(tiny_sharp, block_edits=1, sealed_gates=False, max_steps=80, stop_loss=0.1)
    try:
        result = ed.edit(EDITS[0])
        assert ed.interventions.sealed_blocks == 1 and not ed.interventions.sealed_gates
        assert "margin" not in result.losses and "balance" not in result.losses
        assert result.steps < ed.config.max_steps  # it converged, so the last loss is the final one
        assert abs(first_loss(ed, EDITS[0]) - result.losses["ce"]) < 1e-3
        assert all(w == 1.0 for weights in result.basis_weights.values() for w in weights)
    finally:
        ed.attachment.detach()


def test_replay_samples_only_the_trainable_block(tiny_sharp):
    ed = make_editor(tiny_sharp, block_edits=3, replay_size=8)
    try:
        for request in EDITS[:4]:
            ed.edit(request)
        # Block 1 (edits 0-2) is sealed; the trainable block holds edit 3 alone.
        assert ed._block_history() == [EDITS[3]]
        assert ed._replay_sample() == [EDITS[3]]
    finally:
        ed.attachment.detach()


def test_sealed_edits_become_negatives_in_a_bounded_sample(tiny_sharp):
    ed = make_editor(tiny_sharp, block_edits=1, negative_edits=2, sealed_gates=True)
    try:
        for request in EDITS:
            ed.edit(request)
        assert len(ed.trainer.edit_features) == 2  # the sample stays bounded
        features = ed.sealed_edit_features()
        assert all(f.shape[0] > 0 and f.shape[1] == 64 for f in features.values())
        # After a state is loaded the sample is rebuilt from the edit log.
        ed.load_state(ed.interventions, ed.history)
        rebuilt = ed.sealed_edit_features()
        assert len(ed.trainer.edit_features) == 2
        assert all(rebuilt[layer].shape[1] == 64 for layer in ed.layers)
    finally:
        ed.attachment.detach()


def test_block_config_is_checked():
    import pytest

    with pytest.raises(ValueError, match="needs gates"):
        EditConfig(method="reft", block_edits=1).validate()
    with pytest.raises(ValueError, match=">= 0"):
        EditConfig(block_edits=-1).validate()


def test_checkpoint_round_trip_with_sealed_blocks(tiny_sharp, tmp_path):
    ed = make_editor(tiny_sharp, block_edits=1)
    try:
        for request in EDITS[:3]:
            ed.edit(request)
        prompts = [r.prompt for r in EDITS]
        before = ed.generate(prompts, max_new_tokens=6)
        ed.save(tmp_path, "tiny")
        ed.reset()
        ed.load(tmp_path, "tiny")
        assert ed.interventions.sealed_blocks == 3
        assert ed.generate(prompts, max_new_tokens=6) == before
    finally:
        ed.attachment.detach()


def test_sealed_blocks_are_stored_once_across_checkpoints(tiny_sharp, tmp_path):
    import pytest

    from baft_core.checkpoint import CheckpointError

    ed = make_editor(tiny_sharp, block_edits=1)
    segments = tmp_path / "segments"
    try:
        manifests = []
        for i, request in enumerate(EDITS[:3]):
            ed.edit(request)
            manifests.append(ed.save(tmp_path / f"v{i}", "tiny", segments=segments))
        # Three versions holding 1, 2 and 3 blocks: three segment files, not six.
        assert [m["sealed_blocks"] for m in manifests] == [1, 2, 3]
        assert len(list(segments.iterdir())) == 3
        prompts = [r.prompt for r in EDITS]
        expected = ed.generate(prompts, max_new_tokens=6)
        ed.load(tmp_path / "v0", "tiny", segments=segments)
        assert ed.interventions.sealed_blocks == 1
        ed.load(tmp_path / "v2", "tiny", segments=segments)
        assert ed.generate(prompts, max_new_tokens=6) == expected

        victim = sorted(segments.iterdir())[0]
        victim.write_bytes(victim.read_bytes()[:-1] + b"x")
        with pytest.raises(CheckpointError, match="corrupt"):
            ed.load(tmp_path / "v2", "tiny", segments=segments)
        victim.unlink()
        with pytest.raises(CheckpointError, match="missing"):
            ed.load(tmp_path / "v2", "tiny", segments=segments)
    finally:
        ed.attachment.detach()


def test_checkpoint_without_sealed_buffers_still_loads(tiny_sharp, tmp_path):
    """Checkpoints written before blocks existed hold no sealed buffers and no segment list."""
    from checkpoint_support import rewrite_adapter

    def before_blocks(metadata, tensors):
        metadata.pop("segments")
        return metadata, {k: v for k, v in tensors.items() if not k.startswith("sealed.")}

    ed = make_editor(tiny_sharp)  # one block for all edits, as before
    try:
        ed.edit(EDITS[0])
        expected = ed.generate([EDITS[0].prompt], max_new_tokens=6)
        ed.save(tmp_path, "tiny")
        rewrite_adapter(tmp_path, before_blocks)
        ed.reset()
        ed.load(tmp_path, "tiny")
        assert ed.interventions.sealed_blocks == 0
        assert ed.generate([EDITS[0].prompt], max_new_tokens=6) == expected
    finally:
        ed.attachment.detach()


def test_appending_writes_in_place_and_forks_keep_their_rows():
    """Sealing writes into spare room instead of copying every sealed row; an adapter forked
    earlier (an older version) never sees its rows change, whichever of the two seals next."""
    torch.manual_seed(0)
    sealed = SealedBases(16, cutoff=0.1)
    for _ in range(4):
        sealed.append(random_block(16, 3, 0.0))
    storage = sealed.rotation.data_ptr()
    older = copy.deepcopy(sealed, {id(t): t for t in sealed.buffers()})  # as InterventionSet.fork
    kept = {name: tensor.clone() for name, tensor in older.state_dict().items() if tensor.dim()}
    newer = random_block(16, 3, 0.0)
    sealed.append(newer)
    assert sealed.rotation.data_ptr() == storage  # written in place
    assert torch.equal(sealed.rotation[-3:], newer.rotation.weight.detach())
    other = random_block(16, 3, 1.0)
    older.append(other)  # the room after its rows is taken: it copies
    assert older.rotation.data_ptr() != storage
    assert torch.equal(sealed.rotation[-3:], newer.rotation.weight.detach())
    assert torch.equal(older.rotation[-3:], other.rotation.weight.detach())
    assert all(torch.equal(older.state_dict()[name][: len(kept[name])], kept[name]) for name in kept)
    assert sealed.num_bases == older.num_bases == 15


def ungated_block(d: int, rank: int, seed: int) -> BasisIntervention:
    generator = torch.Generator().manual_seed(seed)
    block = BasisIntervention(d, rank, gated=False, generator=generator)
    with torch.no_grad():
        block.source.weight.add_(0.3 * torch.randn(rank, d, generator=generator))
        block.source.bias.normal_(generator=generator)
    return block


def test_a_block_sealed_without_gates_keeps_its_strongest_directions():
    """Sealed with all its bases, a block acts exactly as it did; with fewer, as the best
    approximation of its map of that rank (the truncated SVD of R^T [A - R | b], computed here on
    the d x (d + 1) map itself), through orthonormal rows."""
    d, rank = 16, 6
    block = ungated_block(d, rank, seed=0)
    h = torch.randn(40, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = block(h)[0] - h
        full_map = block.R.T @ torch.cat([block.source.weight - block.R, block.source.bias.unsqueeze(1)], 1)
    inputs = torch.cat([h, torch.ones(len(h), 1)], 1)
    for kept in (rank, 2):
        sealed = SealedBases(d, cutoff=0.1, use_gates=False, sealed_rank=kept)
        sealed.append(block)
        assert sealed.num_bases == kept
        # Held in fp16: equal to fp16's rounding (2^-11 relative).
        assert sealed.rotation.dtype == torch.float16
        rotation = sealed.rotation.double()
        assert torch.allclose(rotation @ rotation.T, torch.eye(kept, dtype=torch.double), atol=2e-3)
        delta, _ = sealed(h, gate_inputs(h), torch.ones(len(h), kept, dtype=torch.bool))
        left, strength, right = torch.linalg.svd(full_map.double())
        best = (left[:, :kept] * strength[:kept]) @ right[:kept]
        assert torch.allclose(delta.double(), inputs.double() @ best.T, rtol=5e-3, atol=5e-3)
        if kept == rank:
            assert torch.allclose(delta, trained, rtol=5e-3, atol=5e-3)
        else:
            assert (delta - trained).norm() > 1e-3 * trained.norm()


def test_a_map_left_alone_on_states_stays_so_when_sealed_with_fewer_bases():
    """`leave_alone` makes the change zero on some states; its strongest directions lie in its row
    space, so the sealed block leaves those states alone too."""
    from baft_core.intervention import kept_span

    d, rank = 16, 6
    block = ungated_block(d, rank, seed=2)
    kept_states = torch.randn(5, d, generator=torch.Generator().manual_seed(3)) * 4
    block.leave_alone(*kept_span(kept_states))
    sealed = SealedBases(d, cutoff=0.1, use_gates=False, sealed_rank=2)
    sealed.append(block)
    everywhere = torch.ones(len(kept_states), 2, dtype=torch.bool)
    delta, _ = sealed(kept_states, gate_inputs(kept_states), everywhere)
    assert delta.norm(dim=-1).max() < 1e-3 * kept_states.norm(dim=-1).min()  # but for fp16 rounding
    other = torch.randn(5, d, generator=torch.Generator().manual_seed(4))
    assert sealed(other, gate_inputs(other), everywhere)[0].norm() > 1e-2


def test_blocks_with_gates_keep_every_basis():
    """A gate belongs to one basis: blocks sealed with their gates are never reduced."""
    sealed = SealedBases(16, cutoff=0.1, use_gates=True, sealed_rank=2)
    sealed.append(random_block(16, 5, 0.0))
    assert sealed.num_bases == 5 and sealed.gate_weight.shape[0] == 5


def test_an_editor_seals_blocks_at_their_sealed_rank(tiny_sharp, tmp_path):
    """Each sealed block keeps `sealed_rank` bases per layer; routing and checkpoints follow."""
    ed = make_editor(tiny_sharp, block_edits=1, rank=8, sealed_rank=3, max_steps=60)
    try:
        for request in EDITS[:3]:
            ed.edit(request)
        state = ed.interventions
        assert state.sealed_blocks == 3 and state.sealed_rank == 3
        assert all(state.sealed[str(layer)].num_bases == 9 for layer in ed.layers)
        answers = ed.generate([e.prompt for e in EDITS[:3]], max_new_tokens=4)
        ed.save(tmp_path, "tiny")
        ed.reset()
        ed.load(tmp_path, "tiny")
        assert ed.interventions.sealed_blocks == 3
        assert ed.generate([e.prompt for e in EDITS[:3]], max_new_tokens=4) == answers
    finally:
        ed.attachment.detach()
