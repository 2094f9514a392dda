"""BasisIntervention / InterventionSet: the formula, the identity at init, orthonormality of R under
the Editor's own optimizer, and gates that keep learning at realistic residual norms."""
from __future__ import annotations

import pytest
import torch

from baft_core import EditConfig, Editor
from baft_core.attach import InterventionSet
from baft_core.intervention import BasisIntervention
from baft_core.objective import locality_margin

D, RANK = 64, 8


def perturbed(gated: bool, seed: int = 0, gate_bias: float | None = None) -> BasisIntervention:
    torch.manual_seed(seed)
    module = BasisIntervention(D, RANK, gated=gated)
    with torch.no_grad():
        module.source.weight.add_(0.3 * torch.randn_like(module.source.weight))
        module.source.bias.copy_(torch.randn(RANK))
        if gated:
            module.gate.weight.normal_(std=0.15)
            if gate_bias is not None:
                module.gate.bias.fill_(gate_bias)
    return module


def test_shapes_and_orthonormal_init():
    torch.manual_seed(0)
    module = BasisIntervention(D, RANK)
    h = torch.randn(2, 5, D)
    out, w = module(h)
    assert out.shape == (2, 5, D)
    assert w.shape == (2, 5, RANK)
    assert module.R.shape == (RANK, D)
    assert torch.allclose(module.R @ module.R.T, torch.eye(RANK), atol=1e-5)
    # dtype is preserved on the way out, computed in fp32 inside
    out16, _ = module(h.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16


def test_rank_larger_than_hidden_raises():
    with pytest.raises(ValueError, match="exceeds hidden size"):
        BasisIntervention(8, 9)


def test_fresh_intervention_is_identity():
    torch.manual_seed(1)
    for gated in (True, False):
        module = BasisIntervention(D, RANK, gated=gated)
        if gated:  # identity whatever the gates say: open them fully
            with torch.no_grad():
                module.gate.bias.fill_(10.0)
        h = 50 * torch.randn(7, D)
        out, _ = module(h)
        assert torch.allclose(out, h, atol=1e-3), (out - h).abs().max()


def test_ungated_equals_hand_computed_loreft():
    module = perturbed(gated=False)
    h = torch.randn(6, D)
    out, w = module(h)
    R = module.R.detach()
    A, b = module.source.weight.detach(), module.source.bias.detach()
    expected = h + (h @ A.T + b - h @ R.T) @ R  # h + R^T (A h + b - R h)
    assert torch.equal(w, torch.ones(6, RANK))
    assert torch.allclose(out, expected, atol=1e-5)
    assert (out - h).abs().max() > 0.1  # the perturbation is visible


def test_reft_config_builds_ungated_interventions(tiny):
    editor = Editor(tiny.model, tiny.tokenizer, EditConfig(method="reft", layers=[1], rank=4))
    try:
        module = editor.interventions[1]
        assert not module.gated and not hasattr(module, "gate")
        h = torch.randn(3, 64)
        assert torch.equal(module.weights(h), torch.ones(3, 4))
    finally:
        editor.attachment.detach()


def test_gated_equals_hand_computed_formula():
    module = perturbed(gated=True, gate_bias=0.0)
    h = 30 * torch.randn(6, D)
    out, w = module(h)
    R = module.R.detach()
    A, b = module.source.weight.detach(), module.source.bias.detach()
    G, c = module.gate.weight.detach(), module.gate.bias.detach()
    x = h
    if hasattr(module, "gate_center"):  # per-coordinate standardisation of the gate input
        with torch.no_grad():
            module.gate_center.copy_(torch.randn(D))
            module.gate_scale.copy_(torch.rand(D) + 0.5)
        out, w = module(h)
        x = (h - module.gate_center) / module.gate_scale
    unit = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    weights = torch.sigmoid(unit @ G.T + c)  # diag of W(h)
    expected = h + ((h @ A.T + b - h @ R.T) * weights) @ R  # h + R^T W(h) (A h + b - R h)
    assert torch.allclose(w, weights, atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-4)
    # W(h) really is input-dependent and partial: not a constant, not saturated
    assert w.std() > 0.05 and 0 < w.min() and w.max() < 1
    # differs from LoReFT with the same parameters
    loreft = h + (h @ A.T + b - h @ R.T) @ R
    assert not torch.allclose(out, loreft, atol=1e-2)


def test_R_stays_orthonormal_after_100_adamw_steps_with_editor_grouping(tiny):
    config = EditConfig(layers=[1, 2], rank=6, weight_decay=0.1, lr=5e-2)
    editor = Editor(tiny.model, tiny.tokenizer, config, unrelated_prompts=[])
    try:
        interventions = editor.new_interventions()
        optimizer = editor.trainer._optimizer(interventions)
        # the real grouping: no decay on R, decay on A/b, gate params in their own group
        rotation_ids = {
            id(p) for layer in interventions.layers for p in interventions[layer].rotation.parameters()
        }
        source_ids = {
            id(p) for layer in interventions.layers for p in interventions[layer].source.parameters()
        }
        for group in optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            if ids & rotation_ids:
                assert ids <= rotation_ids and group["weight_decay"] == 0.0
            if ids & source_ids:
                assert group["weight_decay"] == pytest.approx(0.1)
        covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert covered == {id(p) for p in interventions.parameters()}

        torch.manual_seed(0)
        h = 20 * torch.randn(32, 64)
        goal = torch.randn(32, 64) * 20
        R0 = {layer: interventions[layer].R.detach().clone() for layer in interventions.layers}
        for _ in range(100):
            loss = sum(((interventions[layer](h)[0] - goal) ** 2).mean() for layer in interventions.layers)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for layer in interventions.layers:
            R = interventions[layer].R.detach()
            assert (R - R0[layer]).abs().max() > 1e-2, "R did not train at all"
            assert torch.linalg.norm(R @ R.T - torch.eye(6)) < 1e-4
    finally:
        editor.attachment.detach()


def test_gates_keep_learning_at_large_residual_norms():
    torch.manual_seed(0)
    module = BasisIntervention(D, RANK, gated=True)
    direction = torch.randn(D)
    edit = direction + 0.3 * torch.randn(16, D)
    unrelated = torch.randn(64, D)
    edit = 1000 * edit / edit.norm(dim=-1, keepdim=True)  # residual norms ~1000
    unrelated = 1000 * unrelated / unrelated.norm(dim=-1, keepdim=True)

    w_edit, w_unrel = module.weights(edit), module.weights(unrelated)
    assert 0 < w_edit.min() and w_edit.max() < 1 and 0 < w_unrel.min() and w_unrel.max() < 1
    assert w_edit.mean() < 0.2 and w_unrel.mean() < 0.2  # starts mostly closed (negative bias)
    start_gap = (w_edit.mean() - w_unrel.mean()).item()

    optimizer = torch.optim.AdamW(module.gate.parameters(), lr=5e-2, weight_decay=0.0)
    for _ in range(10):
        loss = locality_margin(
            module.gate_logits(edit), module.gate_logits(unrelated), alpha=0.01, beta=0.05, gamma=0.02
        )
        optimizer.zero_grad()
        loss.backward()
        grad = module.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
        optimizer.step()
    w_edit, w_unrel = module.weights(edit).detach(), module.weights(unrelated).detach()
    assert w_edit.mean() - w_unrel.mean() > start_gap + 0.05
    # the top edit weight (what the gap term of the margin pushes) beats the top unrelated one
    assert w_edit.max(-1).values.min() > w_unrel.max(-1).values.max(), (w_edit.max(-1), w_unrel.max(-1))
    assert w_edit.max() < 1 and w_unrel.min() > 0  # not saturated


def test_intervention_set_layers_and_buffers():
    torch.manual_seed(0)
    interventions = InterventionSet(D, [3, 1], RANK, gated=True)
    assert interventions.layers == [3, 1]
    assert isinstance(interventions[1], BasisIntervention)
    assert interventions.usage_sum.shape == (2, RANK)
    assert int(interventions.edit_count) == 0
    per_layer = sum(p.numel() for p in interventions[1].parameters())
    assert interventions.num_parameters() == 2 * per_layer
    with pytest.raises(KeyError):
        interventions[2]


def test_baft_and_reft_with_one_seed_start_from_the_same_bases():
    """Gates are drawn after every layer's bases, here and for the fresh block after a seal, so a
    BaFT/ReFT comparison is not also a comparison of two random draws of R."""
    layers = [1, 3, 5]

    def drawn(gated: bool) -> InterventionSet:
        return InterventionSet(D, layers, RANK, gated=gated, route_threshold=0.5, sealed_gates=False)

    baft, reft = drawn(True), drawn(False)
    first = baft[1].R.detach().clone()
    for layer in layers:
        assert torch.equal(baft[layer].R, reft[layer].R)
        assert baft[layer].gated and not hasattr(reft[layer], "gate")
    baft.seal()
    after_seal = reft._fresh_blocks(reft.block_generator(1))  # what a seal draws next
    for layer in layers:
        assert torch.equal(baft[layer].R, after_seal[str(layer)].R)
        assert torch.equal(baft[layer].source.weight, after_seal[str(layer)].source.weight)
    assert torch.equal(baft.sealed["1"].rotation, first.half())  # ungated sealed rows are fp16
    assert not torch.equal(baft[1].R, first)  # the block after a seal is a new draw


def test_blocks_are_drawn_from_the_seed_and_their_index_alone():
    """Whatever the global generator did in between, the n-th block of one seed is the same: an
    adapter reloaded halfway through a history draws what one that never was would."""
    torch.manual_seed(1)
    one = InterventionSet(D, [1, 3], RANK, gated=True, seed=7)
    one.seal()
    torch.manual_seed(2)
    torch.rand(100)
    two = InterventionSet(D, [1, 3], RANK, gated=True, seed=7)
    two.seal()
    other = InterventionSet(D, [1, 3], RANK, gated=True, seed=8)
    for layer in (1, 3):
        assert torch.equal(one[layer].R, two[layer].R)
        assert torch.equal(one[layer].gate.weight, two[layer].gate.weight)
        assert not torch.equal(one.sealed[str(layer)].rotation, other[layer].R)

