"""fp16 weights with fp32 arithmetic (FBGEMM): the products are those of the fp16-rounded weights,
gradients reach the input and only the input, and `auto` picks it wherever FBGEMM runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from baft_core import EditConfig, EditRequest, Editor, load_model
from baft_core import fp16_weights
from baft_core.fp16_weights import Fp16Linear, pack_linears
from baft_core.models import FP16_WEIGHTS, load_dtype, resolve_precision
from test_core_editor import UNRELATED

pytestmark = pytest.mark.skipif(not fp16_weights.supported(), reason="FBGEMM does not run on this CPU")


def _rounded(linear: nn.Linear) -> nn.Linear:
    """The same layer with its weight rounded to fp16 and back: what Fp16Linear multiplies by."""
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        copy.weight.copy_(linear.weight.half().float())
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    return copy


@pytest.mark.parametrize("bias", [True, False])
def test_products_are_those_of_the_fp16_weights(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    reference, packed = _rounded(linear), Fp16Linear(linear)
    x = torch.randn(3, 7, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = packed(x), reference(x_ref)
    assert y.shape == (3, 7, 40)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    # the fp32 weight itself differs by fp16 rounding: more than the tolerance above, far less than 1e-2
    assert 1e-5 < (linear(x) - y).abs().max() < 1e-2
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert not list(packed.parameters())  # nothing in it trains or is saved
    assert not packed.state_dict()


def test_refuses_other_input_dtypes():
    packed = Fp16Linear(nn.Linear(8, 4))
    with pytest.raises(TypeError, match="fp32 inputs, got torch.bfloat16"):
        packed(torch.randn(2, 8, dtype=torch.bfloat16))


def test_packed_model_matches_its_fp16_rounded_self(tiny_dir):
    """Every linear layer, the tied output head included, is packed; the embedding table is not."""
    fp32 = load_model(str(tiny_dir), device="cpu", dtype="float32")
    packed = load_model(str(tiny_dir), device="cpu", dtype=FP16_WEIGHTS)
    assert packed.precision == FP16_WEIGHTS and fp32.precision == "float32"
    linears = [m for m in fp32.model.modules() if type(m) is nn.Linear]
    assert sum(isinstance(m, Fp16Linear) for m in packed.model.modules()) == len(linears) == 4 * 7 + 1
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    assert packed.model.get_input_embeddings().weight.dtype == torch.float32
    # The reference: the fp32 model with each linear weight rounded to fp16, its tied embedding
    # table untied first and left as it was.
    embedding = fp32.model.get_input_embeddings()
    table = embedding.weight.detach().clone()
    with torch.no_grad():
        for module in linears:
            module.weight.copy_(module.weight.half().float())
    embedding.weight = nn.Parameter(table)
    ids = fp32.tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = fp32.model(**ids).logits
        got = packed.model(**ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_an_edit_trains_through_packed_layers_as_in_fp32(tiny_sharp_dir):
    """The tiny model with range in its logits, edited as in test_core_editor.py: the same edit
    in fp32 and on fp16 weights ends at nearly the same loss and says the target."""
    request = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese")
    config = EditConfig(max_steps=20, rank=8, lr=0.05, layers=[1, 2, 3], block_edits=0)
    losses = {}
    for precision in ("float32", FP16_WEIGHTS):
        loaded = load_model(str(tiny_sharp_dir), device="cpu", dtype=precision)
        torch.manual_seed(0)
        editor = Editor(loaded.model, loaded.tokenizer, config, unrelated_prompts=UNRELATED)
        losses[precision] = editor.edit(request).losses["ce"]
        assert editor.generate([request.prompt], 3)[0].strip().startswith("Japanese")
    assert losses[FP16_WEIGHTS] < 0.5 and abs(losses[FP16_WEIGHTS] - losses["float32"]) < 0.05, losses


def test_pack_linears_leaves_other_dtypes_alone():
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8))
    assert pack_linears(model) == 1
    assert type(model[0]) is nn.Linear and isinstance(model[1], Fp16Linear)


@pytest.mark.parametrize(
    "features, supported, expected",
    [
        ({}, True, FP16_WEIGHTS),  # AVX2: fp32 arithmetic on fp16 weights
        ({"avx512_bf16": True}, True, FP16_WEIGHTS),  # faster than bf16 there too (weights_speed_vs_bf16.json)
        ({}, False, "float32"),  # no FBGEMM (an ARM CPU without bf16, say)
        ({"bf16": True}, False, "bfloat16"),  # ARM with BF16
    ],
)
def test_auto_picks_fp16_weights_wherever_fbgemm_runs(monkeypatch, features, supported, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: features)
    monkeypatch.setattr(fp16_weights, "supported", lambda: supported)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert load_dtype(expected) == (torch.bfloat16 if expected == "bfloat16" else torch.float32)
    assert resolve_precision(None, torch.device("cuda")) == "bfloat16"


def test_fp16_weights_needs_fbgemm_on_a_cpu(monkeypatch):
    with pytest.raises(ValueError, match="needs a CPU that FBGEMM supports"):
        resolve_precision(FP16_WEIGHTS, torch.device("cuda"))
    monkeypatch.setattr(fp16_weights, "supported", lambda: False)
    with pytest.raises(ValueError, match="needs a CPU that FBGEMM supports"):
        resolve_precision(FP16_WEIGHTS, torch.device("cpu"))
