"""Frozen linear layers with their weights packed for few-row products on a CPU.

An edit's training step multiplies about ten rows by every frozen weight above the first edited
layer, forward and backward; generation multiplies one. Such products wait on reading the
weights, in whatever layout the matmul kernel wants them: a plain weight is re-laid-out on every
call. Packing each weight once, in that layout, and a second copy of its transpose for the
backward product (gradient times the weight), leaves the kernel only the reading. Nothing here
trains, the gradient reaches the input alone, and the packed copies are opaque: plain attributes,
never moved or saved. Three kinds:

- `Fp16Linear` (`fp16-weights`, FBGEMM, x86 with AVX2 and F16C): fp32 activations and
  accumulation on weights rounded to fp16 (11-bit significand, against bf16's 8), widened to fp32
  in registers. FBGEMM pads each copy's inner dimension to a multiple of 512 (SmolLM2's 576 to
  1024) in memory, not in what a product reads: the two copies take about 1.5x the fp32 weight's
  bytes. Its kernel is built for a few rows: on hundreds it is slower than fp32.
- `Bf16Linear` (`bfloat16` on a CPU, oneDNN): the bf16 model's own products, with weights packed
  for oneDNN's kernels (AMX tiles where the CPU has them).
- `Fp32Linear` (`fp32-packed`, oneDNN): fp32 throughout, the weights in oneDNN's layout.

Which is fastest depends on the CPU (its bf16 and AMX support above all), so none is chosen here:
`precision.py` times them on the host.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@functools.cache
def fp16_supported() -> bool:
    """FBGEMM is in this torch build and this CPU has what its fp16 kernels need (AVX2 and F16C)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and _runs(Fp16Linear)


@functools.cache
def bf16_supported() -> bool:
    """oneDNN is in this torch build and packs and multiplies bf16 weights on this CPU."""
    return torch.backends.mkldnn.is_available() and _runs(Bf16Linear)


@functools.cache
def fp32_supported() -> bool:
    """oneDNN is in this torch build and packs and multiplies fp32 weights on this CPU."""
    return torch.backends.mkldnn.is_available() and _runs(Fp32Linear)


def _runs(kind: type[_PackedLinear]) -> bool:
    """A packed product of `kind` runs here."""
    try:
        kind(nn.Linear(1, 1, bias=False).to(kind.dtype))(torch.zeros(1, 1, dtype=kind.dtype))
    except RuntimeError:  # "Your CPU does not support FBGEMM."; bf16 with oneDNN capped below AVX512
        return False
    return True


class _FrozenProduct(torch.autograd.Function):
    """x @ W^T + bias with W frozen: the gradient flows to x alone."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, linear: _PackedLinear) -> torch.Tensor:
        ctx.linear = linear
        return linear.product(x.contiguous(), linear.packed, linear.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        linear = ctx.linear
        return linear.product(grad.contiguous(), linear.packed_t, None), None


class _PackedLinear(nn.Module):
    """Stands in for a frozen `nn.Linear` of `dtype`; nothing in it is trainable or saved."""

    dtype: torch.dtype
    kernel: str
    # The packed weight is the kind's own (a tensor in oneDNN's layout, FBGEMM's ScriptObject)
    pack: Callable[[torch.Tensor], Any]
    product: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__} packs {self.dtype} weights, got {weight.dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = self.pack(weight)
        self.packed_t = self.pack(weight.t().contiguous())
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__} takes {self.dtype} inputs, got {x.dtype}")
        return _FrozenProduct.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for {self.kernel}"


class Fp16Linear(_PackedLinear):
    """fp32 arithmetic on fp16 weights (FBGEMM), on all of torch's threads. The quantized
    namespace's op splits a product's columns over the threads; torch's older
    `fbgemm_linear_fp16_weight_fp32_activation`, with the same packing and the same results,
    runs on one, which left the second core idle through most of a training step."""

    dtype, kernel = torch.float32, "FBGEMM fp16, threaded"

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.ScriptObject:
        return torch.ops.quantized.linear_prepack_fp16(weight, None)

    @staticmethod
    def product(x: torch.Tensor, packed: torch.ScriptObject, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic_fp16(x, packed)
        return out if bias is None else out.add_(bias)


class _OneDnnLinear(_PackedLinear):
    """Products on weights in oneDNN's layout."""

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)

    @staticmethod
    def product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Bf16Linear(_OneDnnLinear):
    dtype, kernel = torch.bfloat16, "oneDNN bf16"


class Fp32Linear(_OneDnnLinear):
    dtype, kernel = torch.float32, "oneDNN fp32"


KINDS = (Fp16Linear, Bf16Linear, Fp32Linear)


def pack_linears(model: nn.Module, kind: type[_PackedLinear]) -> int:
    """Replace every CPU `nn.Linear` of `kind.dtype` in a frozen model (decoder layers and output
    head) by a `kind`; returns how many. Embeddings stay as they are: a tied output head gets its
    own packed copies and the input embedding keeps its table."""
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == kind.dtype and child.weight.device.type == "cpu"
    ]
    # One layer at a time, each weight freed before the next is packed: the allocator then
    # reuses its memory for the packed copies instead of growing the process.
    for parent, name in sites:
        setattr(parent, name, kind(getattr(parent, name)))
    return len(sites)
