"""The BaFT intervention: Phi(h) = h + R^T W(h) (A h + b - R h).

R (r x d) has orthonormal rows, kept so by torch's orthogonal parametrization. A and b give the
target coordinates in that subspace. W(h) = diag(w_1(h) .. w_r(h)), each w_k a logistic
regression on h saying how much basis k acts for this input. With gated=False, W = I and the
intervention is exactly LoReFT.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations


class BasisIntervention(nn.Module):
    def __init__(self, hidden_size: int, rank: int, gated: bool = True, gate_bias: float = -3.0):
        super().__init__()
        if rank > hidden_size:
            raise ValueError(f"rank {rank} exceeds hidden size {hidden_size}")
        self.hidden_size, self.rank, self.gated = hidden_size, rank, gated
        rotation = nn.Linear(hidden_size, rank, bias=False)
        nn.init.orthogonal_(rotation.weight)
        self.rotation = parametrizations.orthogonal(rotation)
        self.source = nn.Linear(hidden_size, rank)  # A h + b
        with torch.no_grad():
            # A = R and b = 0 make a fresh intervention the identity, whatever the gates say.
            self.source.weight.copy_(self.rotation.weight)
            self.source.bias.zero_()
        if gated:
            # The gate reads h scaled to unit RMS: residual norms reach the thousands and a
            # logistic regression on raw h saturates in a few steps. A negative bias starts
            # every basis nearly closed, so an unedited adapter leaves inputs alone.
            self.gate = nn.Linear(hidden_size, rank)
            nn.init.normal_(self.gate.weight, std=hidden_size**-0.5)
            nn.init.constant_(self.gate.bias, gate_bias)

    @property
    def R(self) -> torch.Tensor:
        return self.rotation.weight

    def gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.gate.weight.dtype)
        unit = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.gate(unit)

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """w(h) in [0, 1]^r; all ones for ReFT."""
        if not self.gated:
            return h.new_ones(*h.shape[:-1], self.rank)
        return torch.sigmoid(self.gate_logits(h))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns Phi(h) and the basis weights w(h). Computed in the parameters' dtype (fp32)."""
        dtype = h.dtype
        h = h.to(self.source.weight.dtype)
        R = self.R
        w = self.weights(h)
        delta = (self.source(h) - h @ R.T) * w
        return (h + delta @ R).to(dtype), w
