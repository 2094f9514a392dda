"""Frozen linear layers with fp16 weights and fp32 arithmetic, through FBGEMM: what `auto` runs on
x86 CPUs, faster there than fp32 and than bf16 (bench/results/weights_speed*.json).

An edit's training step multiplies about ten rows by every frozen weight above the first edited
layer, forward and backward, so on a CPU it waits on reading the weights, not on arithmetic.
FBGEMM's fp16 GEMM keeps the weight in half the bytes, packed for exactly these few-row products,
and widens it to fp32 in registers (AVX2 with F16C, or AVX512). The backward product (gradient
times the weight) gets its own packed copy of the transposed weight. FBGEMM pads each copy's inner
dimension to a multiple of 512 (SmolLM2's 576 to 1024) in memory, not in what a product reads, so
the two copies take about 1.5x the fp32 weight's bytes (0.8 GB against 0.54 GB on SmolLM2). The
weights are only rounded to fp16 (11-bit significand, against bf16's 8); activations, gradients
and accumulation stay fp32.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

# torch marks these deprecated (its quantisation stack moved to torchao) but 2.13, the pinned
# version, ships and tests them; the warning would repeat on every load.
warnings.filterwarnings("ignore", message="fbgemm_(pack_gemm_matrix|linear)_fp16", category=UserWarning)


def supported() -> bool:
    """FBGEMM is in this torch build and this CPU has what its fp16 kernels need (AVX2 and F16C)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        torch.fbgemm_pack_gemm_matrix_fp16(torch.zeros(1, 1))
    except RuntimeError:  # "Your CPU does not support FBGEMM."
        return False
    return True


class _PackedProduct(torch.autograd.Function):
    """x @ W^T + bias with W frozen: the gradient flows to x alone."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, linear: "Fp16Linear") -> torch.Tensor:
        ctx.linear = linear
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x.contiguous(), linear.packed, linear.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.fbgemm_linear_fp16_weight_fp32_activation(grad.contiguous(), ctx.linear.packed_t, None), None


class Fp16Linear(nn.Module):
    """Stands in for a frozen fp32 `nn.Linear`; nothing in it is trainable or saved."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()  # fp32: pack_linears takes no other
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Opaque packed matrices, not tensors that could be moved or saved: plain attributes.
        self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight)
        self.packed_t = torch.fbgemm_pack_gemm_matrix_fp16(weight.t().contiguous())
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"fp16-weight layers take fp32 inputs, got {x.dtype}")
        return _PackedProduct.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (FBGEMM)"


def pack_linears(model: nn.Module) -> int:
    """Replace every fp32 `nn.Linear` of a frozen CPU model (decoder layers and output head) by an
    `Fp16Linear`; returns how many. Embeddings stay as they are: a tied output head gets its own
    packed copies and the input embedding keeps the fp32 table."""
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
    ]
    # One layer at a time, each fp32 weight freed before the next is packed: the allocator then
    # reuses its memory for the packed copies instead of growing the process.
    for parent, name in sites:
        setattr(parent, name, Fp16Linear(getattr(parent, name)))
    return len(sites)
