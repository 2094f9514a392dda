"""Capacity in fixed-size blocks: the frozen bases of sealed blocks.

One block (a BasisIntervention of rank r per layer) holds a fixed number of edits. When it is
full it is sealed: its bases are appended here and frozen, and a fresh block takes the next
edits. All sealed bases of a layer act as one wide BaFT intervention,

    Phi(h) = h + sum_k R_k^T w_k(h) (A_k h + b_k - R_k h),

each basis k with its own gate. Two things keep a growing number of bases cheap and local:
- a basis whose gate is below `cutoff` (the locality margin alpha) is off, exactly: a thousand
  gates that each leak 0.005 would otherwise add up to a real change on every input;
- only the bases some position opens are computed, so the cost per token is one gate product
  over all bases plus a few small ones.
"""
from __future__ import annotations

import torch
from torch import nn

from .intervention import BasisIntervention

_ROWS = ("rotation", "source_weight", "gate_weight")  # [bases, d]
_BIASES = ("source_bias", "gate_bias")  # [bases]


class SealedBases(nn.Module):
    def __init__(self, hidden_size: int, cutoff: float):
        super().__init__()
        self.hidden_size = hidden_size
        for name in _ROWS:
            self.register_buffer(name, torch.zeros(0, hidden_size))
        for name in _BIASES:
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("cutoff", torch.tensor(float(cutoff)))

    @property
    def num_bases(self) -> int:
        return self.rotation.shape[0]

    @property
    def num_values(self) -> int:
        """Stored numbers of all sealed bases (the memory the blocks cost)."""
        return sum(getattr(self, name).numel() for name in _ROWS + _BIASES)

    @torch.no_grad()
    def append(self, block: BasisIntervention) -> None:
        """Freeze a block's bases. New tensors, not in-place writes: an adapter forked before
        this call (an older published version) keeps its own bases."""
        new = {
            "rotation": block.rotation.weight,
            "source_weight": block.source.weight,
            "gate_weight": block.gate.weight,
            "source_bias": block.source.bias,
            "gate_bias": block.gate.bias,
        }
        for name, value in new.items():
            setattr(self, name, torch.cat([getattr(self, name), value.detach().to(getattr(self, name))]))

    def weights(self, gate_inputs: torch.Tensor) -> torch.Tensor:
        """w [n, bases] with the gates below the cutoff set to exactly 0."""
        w = torch.sigmoid(gate_inputs @ self.gate_weight.T + self.gate_bias)
        return w * (w > self.cutoff)

    def forward(self, h: torch.Tensor, gate_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed change of all sealed bases at h [n, d] (fp32), and their weights [n, bases].
        `gate_inputs` is h as the gates read it: every block of a layer shares the trainable
        block's standardisation (`BasisIntervention.gate_inputs`), computed once by the caller."""
        if self.num_bases == 0:
            return torch.zeros_like(h), h.new_zeros(h.shape[0], 0)
        w = self.weights(gate_inputs)
        open_bases = w.detach().amax(0).nonzero().squeeze(1)
        if open_bases.numel() == 0:
            return torch.zeros_like(h), w
        R = self.rotation[open_bases]
        coordinates = h @ self.source_weight[open_bases].T + self.source_bias[open_bases] - h @ R.T
        return (coordinates * w[:, open_bases]) @ R, w

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of sealed bases is whatever the checkpoint holds.
        for name in _ROWS + _BIASES:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
