"""The BaFT intervention: Phi(h) = h + R^T W(h) (A h + b - R h).

R (r x d) has orthonormal rows, kept so by a QR retraction after every optimizer step (a
parametrization would cost a Householder product and its backward at every forward). A and b give the
target coordinates in that subspace. W(h) = diag(w_1(h) .. w_r(h)), each w_k a logistic
regression on h saying how much basis k acts for this input. With gated=False, W = I and the
intervention is exactly LoReFT.
"""
from __future__ import annotations

import torch
from torch import nn


def standardize(h: torch.Tensor, center: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What a gate's logistic regression reads: h standardised per coordinate, then scaled to
    unit RMS (so its norm is sqrt(d) whatever the layer's residual norm)."""
    x = (h - center) / scale
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@torch.no_grad()
def statistics(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and standard deviation (floored; 1 from a single row) of ordinary
    states [n, d], in fp32: the `center` and `scale` that standardisation uses."""
    hidden = hidden.float()
    scale = hidden.std(0).clamp_min(1e-3) if len(hidden) > 1 else torch.ones_like(hidden[0])
    return hidden.mean(0), scale


@torch.no_grad()
def kept_span(states: torch.Tensor) -> tuple[torch.Tensor, float]:
    """What `BasisIntervention.leave_alone` takes for states [n, d] that a block must leave as
    they are: an orthonormal basis [d + 1, k] of the span of the rows [h, s], with s their mean
    norm (so that the column that carries b weighs like the others), and s."""
    scale = states.norm(dim=-1).mean().clamp_min(1e-6).item()
    rows = torch.cat([states, states.new_full((len(states), 1), scale)], dim=-1).double()
    basis, sigma, _ = torch.linalg.svd(rows.T, full_matrices=False)
    return basis[:, sigma > sigma[0] * 1e-6].float(), scale


class BasisIntervention(nn.Module):
    # Buffers (`add_gates`)
    gate_center: torch.Tensor
    gate_scale: torch.Tensor

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        gated: bool = True,
        gate_bias: float = -5.6,
        generator: torch.Generator | None = None,
    ):
        """`generator` draws R (and the gates' weights); None: the global one."""
        super().__init__()
        if rank > hidden_size:
            raise ValueError(f"rank {rank} exceeds hidden size {hidden_size}")
        self.hidden_size, self.rank = hidden_size, rank
        # When False, the edit loss does not train the gates (only the locality margins do).
        self.gate_follows_edit = True
        # Gates below this act as exactly 0, as in a sealed block (set while fitting before sealing).
        self.cutoff = 0.0
        self.rotation = nn.Linear(hidden_size, rank, bias=False)
        nn.init.orthogonal_(self.rotation.weight, generator=generator)
        self.source = nn.Linear(hidden_size, rank)  # A h + b
        with torch.no_grad():
            # A = R and b = 0 make a fresh intervention the identity, whatever the gates say.
            self.source.weight.copy_(self.rotation.weight)
            self.source.bias.zero_()
        self.gated = False
        if gated:
            self.add_gates(gate_bias, generator)

    def add_gates(self, gate_bias: float = -5.6, generator: torch.Generator | None = None) -> None:
        """Gives every basis its gate (W(h)). Separate from the constructor so that a set of
        blocks can draw all its bases first: then BaFT and ReFT with one seed start from the same
        R, A and b, and a comparison of the two measures the gates, not two random draws."""
        hidden_size = self.hidden_size
        # The gate reads h standardised per coordinate (statistics of ordinary inputs, set
        # by `calibrate`) and scaled to unit RMS: residual norms reach the thousands, with a
        # large component shared by all tokens, and a logistic regression on raw h
        # saturates in a few steps and cannot tell inputs apart. The bias starts every
        # basis closed (below the locality margin alpha = 0.01).
        self.gate = nn.Linear(hidden_size, self.rank)
        # Small random weights break the symmetry between bases without opening any gate.
        nn.init.normal_(self.gate.weight, std=0.3 * hidden_size**-0.5, generator=generator)
        nn.init.constant_(self.gate.bias, gate_bias)
        self.register_buffer("gate_center", torch.zeros(hidden_size))
        self.register_buffer("gate_scale", torch.ones(hidden_size))
        self.gated = True

    @property
    def R(self) -> torch.Tensor:
        return self.rotation.weight

    @torch.no_grad()
    def orthonormalize(self) -> None:
        """Retract R onto the matrices with orthonormal rows (the nearest such basis of its span,
        signs kept so the basis does not flip)."""
        q, r = torch.linalg.qr(self.rotation.weight.T)
        signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
        self.rotation.weight.copy_((q * signs).T)

    def gate_inputs(self, h: torch.Tensor) -> torch.Tensor:
        """What the gate's logistic regression reads (`standardize`)."""
        return standardize(h.to(self.gate.weight.dtype), self.gate_center, self.gate_scale)

    def gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate(self.gate_inputs(h))

    @torch.no_grad()
    def calibrate(self, center: torch.Tensor, scale: torch.Tensor) -> None:
        """Standardise the gate's input with the `statistics` of ordinary hidden states."""
        self.gate_center.copy_(center)
        self.gate_scale.copy_(scale)

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """w(h) in [0, 1]^r; all ones for ReFT."""
        if not self.gated:
            return h.new_ones(*h.shape[:-1], self.rank)
        return torch.sigmoid(self.gate_logits(h))

    @property
    def is_identity(self) -> bool:
        """Whether Phi(h) = h for every h: A = R and b = 0, as a fresh block is drawn (whatever its
        gates say). Checked on the values, not remembered: training changes them in place."""
        return torch.equal(self.source.weight, self.rotation.weight) and not self.source.bias.any()

    def change(self, h: torch.Tensor) -> torch.Tensor:
        """(A h + b - R h) [n, rank]: the change at full weight, in the block's coordinates."""
        return self.source(h) - h @ self.R.T

    @torch.no_grad()
    def leave_alone(self, space: torch.Tensor, scale: float) -> None:
        """Makes the change A h + b - R h zero on every h whose [h, scale] lies in `space` [d + 1, k]
        (orthonormal columns, `kept_span`): the map's rows lose their components in that span."""
        change = torch.cat([self.source.weight - self.R, (self.source.bias / scale).unsqueeze(1)], dim=1)
        change = change - (change @ space) @ space.T
        self.source.weight.copy_(self.R + change[:, :-1])
        self.source.bias.copy_(change[:, -1] * scale)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns Phi(h) and the basis weights w(h). Computed in the parameters' dtype (fp32)."""
        dtype = h.dtype
        h = h.to(self.source.weight.dtype)
        w = self.weights(h)
        acting = w * (w > self.cutoff) if self.cutoff else w
        delta = self.change(h) * (acting if self.gate_follows_edit else acting.detach())
        return (h + delta @ self.R).to(dtype), w
