"""Frozen linear layers packed for few-row products: fp16 weights with fp32 arithmetic (FBGEMM),
and bf16 or fp32 weights in oneDNN's layout. The products are those of the rounded weights, gradients
reach the input and only the input. Which one `auto` takes: test_core_precision.py."""
from __future__ import annotations

import pytest
import torch
from test_core_editor import UNRELATED
from torch import nn

from baft_core import EditConfig, Editor, EditRequest, load_model, packed_linears
from baft_core.packed_linears import Bf16Linear, Fp16Linear, Fp32Linear, pack_linears
from baft_core.precision import FP16_WEIGHTS, FP32_PACKED

needs_fbgemm = pytest.mark.skipif(not packed_linears.fp16_supported(), reason="FBGEMM does not run on this CPU")
needs_onednn = pytest.mark.skipif(not packed_linears.bf16_supported(), reason="oneDNN does not multiply bf16 here")
needs_onednn_fp32 = pytest.mark.skipif(not packed_linears.fp32_supported(), reason="no oneDNN in this torch build")
# (kind, precision, the dtype of its inputs, what its weights are rounded to, tolerance)
KINDS = [
    pytest.param(Fp16Linear, FP16_WEIGHTS, torch.float32, torch.float16, 1e-5, marks=needs_fbgemm, id="fp16"),
    pytest.param(Bf16Linear, "bfloat16", torch.bfloat16, torch.bfloat16, 2e-2, marks=needs_onednn, id="bf16"),
    pytest.param(Fp32Linear, FP32_PACKED, torch.float32, torch.float32, 1e-5, marks=needs_onednn_fp32, id="fp32"),
]


def _rounded(linear: nn.Linear, weights: torch.dtype, dtype: torch.dtype) -> nn.Linear:
    """The same fp32 layer with its weight rounded to `weights` and its bias to the model's
    `dtype`, and back."""
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        copy.weight.copy_(linear.weight.to(weights).float())
        if linear.bias is not None:
            copy.bias.copy_(linear.bias.to(dtype).float())
    return copy


@pytest.mark.parametrize("kind, precision, dtype, weights, tolerance", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_products_are_those_of_the_rounded_weights(kind, precision, dtype, weights, tolerance, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    reference, packed = _rounded(linear, weights, dtype), kind(linear.to(dtype))
    x = torch.randn(3, 7, 96).to(dtype).requires_grad_(True)
    x_ref = x.detach().float().requires_grad_(True)
    y, y_ref = packed(x), reference(x_ref)
    assert y.shape == (3, 7, 40) and y.dtype == dtype
    assert torch.allclose(y.float(), y_ref, atol=tolerance, rtol=tolerance)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad.float())
    assert x.grad.dtype == dtype
    assert torch.allclose(x.grad.float(), x_ref.grad, atol=tolerance, rtol=tolerance)
    assert not list(packed.parameters())  # nothing in it trains or is saved
    assert not packed.state_dict()


@needs_fbgemm
def test_fp16_products_differ_from_the_fp32_weights_by_rounding_only():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(5, 96)
    assert 1e-5 < (linear(x) - Fp16Linear(linear)(x)).abs().max() < 1e-2


@pytest.mark.parametrize("kind, precision, dtype, weights, tolerance", KINDS)
def test_refuses_other_dtypes(kind, precision, dtype, weights, tolerance):
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    packed = kind(nn.Linear(8, 4).to(dtype))
    with pytest.raises(TypeError, match=f"takes {dtype} inputs, got {other}"):
        packed(torch.randn(2, 8, dtype=other))
    with pytest.raises(TypeError, match=f"packs {dtype} weights, got {other}"):
        kind(nn.Linear(8, 4).to(other))


@pytest.mark.parametrize("kind, precision, dtype, weights, tolerance", KINDS)
def test_packed_model_matches_its_rounded_self(tiny_dir, kind, precision, dtype, weights, tolerance):
    """Every linear layer, the tied output head included, is packed; the embedding table is not."""
    fp32 = load_model(str(tiny_dir), device="cpu", dtype="float32")
    packed = load_model(str(tiny_dir), device="cpu", dtype=precision)
    assert packed.precision == precision and fp32.precision == "float32"
    linears = [m for m in fp32.model.modules() if type(m) is nn.Linear]
    assert sum(isinstance(m, kind) for m in packed.model.modules()) == len(linears) == 4 * 7 + 1
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    assert packed.model.get_input_embeddings().weight.dtype == dtype
    ids = fp32.tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    if dtype == torch.float32:
        # The reference: the fp32 model with each linear weight rounded to the kind's weights
        # (fp16, or fp32: as it was), its tied embedding table untied first and left as it was.
        embedding = fp32.model.get_input_embeddings()
        table = embedding.weight.detach().clone()
        with torch.no_grad():
            for module in linears:
                module.weight.copy_(module.weight.to(weights).float())
        embedding.weight = nn.Parameter(table)
        reference, atol = fp32.model, 1e-4
    else:  # the same bf16 model unpacked: one arithmetic in another weight layout
        reference, atol = load_model(str(tiny_dir), device="cpu", dtype="float32").model.to(dtype), 0.05
    with torch.no_grad():
        expected = reference(**ids).logits.float()
        got = packed.model(**ids).logits.float()
    assert torch.allclose(got, expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("kind, precision, dtype, weights, tolerance", KINDS)
def test_an_edit_trains_through_packed_layers_as_through_plain_ones(
    tiny_sharp_dir, monkeypatch, kind, precision, dtype, weights, tolerance
):
    """The tiny model with range in its logits, edited as in test_core_editor.py: the same edit
    through packed layers and through plain ones (fp32 for fp16 weights, as rounding differs; the
    same bf16 or fp32 weights unpacked) ends at nearly the same loss and says the target."""
    request = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese")
    config = EditConfig(max_steps=20, rank=8, lr=0.05, layers=[1, 2, 3], block_edits=0)
    plain, allowed = {Fp16Linear: ("float32", 0.05), Bf16Linear: ("bfloat16", 1e-3), Fp32Linear: ("float32", 1e-3)}[kind]
    losses = {}
    for name, packs in (("plain", False), ("packed", True)):
        monkeypatch.setattr(packed_linears, "bf16_supported", lambda packs=packs: packs)
        loaded = load_model(str(tiny_sharp_dir), device="cpu", dtype=precision if packs else plain)
        assert any(isinstance(m, kind) for m in loaded.model.modules()) == packs
        torch.manual_seed(0)
        editor = Editor(loaded.model, loaded.tokenizer, config, unrelated_prompts=UNRELATED)
        losses[name] = editor.edit(request).losses["ce"]
        assert editor.generate([request.prompt], 3)[0].strip().startswith("Japanese")
    assert losses["packed"] < 0.5 and abs(losses["packed"] - losses["plain"]) < allowed, losses


def test_pack_linears_leaves_other_dtypes_alone():
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8))
    if packed_linears.fp16_supported():
        assert pack_linears(model, Fp16Linear) == 1
        assert type(model[0]) is nn.Linear and isinstance(model[1], Fp16Linear)
    if packed_linears.bf16_supported():
        assert pack_linears(model, Bf16Linear) == 1
        assert isinstance(model[0], Bf16Linear)


@pytest.mark.skipif(not packed_linears.fp16_supported(), reason="FBGEMM does not run on this CPU")
def test_fp16_products_on_all_threads_equal_those_of_torchs_one_thread_op():
    """`Fp16Linear` runs torch's quantized FBGEMM op, which splits a product's columns over the
    threads; the older op runs on one. Same packing and kernel, so the same numbers to the bit:
    what was measured on the older op still holds."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 700)
    packed = packed_linears.Fp16Linear(linear)
    legacy = torch.fbgemm_pack_gemm_matrix_fp16(linear.weight.detach())
    legacy_t = torch.fbgemm_pack_gemm_matrix_fp16(linear.weight.detach().t().contiguous())
    for rows in (1, 10, 37):
        x = torch.randn(rows, 96, requires_grad=True)
        out = packed(x)
        assert torch.equal(out, torch.fbgemm_linear_fp16_weight_fp32_activation(x.detach(), legacy, linear.bias.detach()))
        grad = torch.randn(rows, 700)
        (x_grad,) = torch.autograd.grad(out, x, grad)
        assert torch.equal(x_grad, torch.fbgemm_linear_fp16_weight_fp32_activation(grad, legacy_t, None))
