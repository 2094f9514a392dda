"""Capacity in fixed-size blocks: the frozen bases of sealed blocks.

One block (a BasisIntervention of rank r per layer) holds a fixed number of edits. When it is
full it is sealed: its bases are appended here and frozen, and a fresh block takes the next
edits. All sealed bases of a layer act as one wide BaFT intervention,

    Phi(h) = h + sum_k R_k^T w_k(h) (A_k h + b_k - R_k h) = h + sum_k R_k^T w_k(h) (C_k h + c_k),

each basis k with its own weight w_k. A sealed basis keeps its change C_k = A_k - R_k and c_k = b_k
(one product with h where A and R took two). By default (routing.py) w_k is the block's route: 1 on
prompts that open the block, exactly 0 elsewhere. With `use_gates` it is also the basis' own
learned gate, and two things keep a growing number of gated bases cheap and local:
- a basis whose gate is below `cutoff` is off, exactly: a thousand gates that each leak 0.005
  would otherwise add up to a real change on every input;
- only the bases some position opens are computed, and with routing only the gates of the
  blocks the prompt opens, so the cost per token barely grows with the number of blocks.

A block that acts without gates (the default) is one linear map h -> R^T (C h + c) of rank at most
r, and Adam's few steps spread its change over all r bases while a few directions carry the edit.
It is sealed as its `sealed_rank` strongest directions (`strongest_directions`), a third of the
memory at 8 of 24, with the 1000-edit ZsRE and CounterFact metrics kept (docs/method.md). A map
that is zero on some states (`BasisIntervention.leave_alone`) stays zero there: its strongest
directions lie in its own row space.
"""
from __future__ import annotations

import torch
from torch import nn

from .intervention import BasisIntervention

_ROWS = ("rotation", "change_weight", "gate_weight")  # [bases, d]
_BIASES = ("change_bias", "gate_bias")  # [bases]
# Without `use_gates` nothing reads a sealed basis' gate, so its rows are not kept: a third of
# what a sealed block costs in memory and on disk.
GATE_ROWS = ("gate_weight", "gate_bias")


def appended(rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`rows` followed by `new`, as a view of a larger tensor with room to spare. Concatenating
    copied every sealed row at every seal, a time per edit that grew with the edits (0.47 s of a
    0.79 s edit after 3,000). The new rows are written in place only if `rows` ends where what was
    written into its tensor ends: adapters forked from one another share these tensors, and one
    that another has already extended from the same point copies instead, so no view ever sees its
    rows change."""
    base, count = rows._base, len(rows)
    if (
        base is not None
        and getattr(base, "written", None) == count
        and rows.data_ptr() == base.data_ptr()
        and len(base) >= count + len(new)
    ):
        base[count : count + len(new)] = new
    else:
        # Room for half as many rows again: a copy every few seals early on, then rarely (on the
        # CPU the untouched room is not resident until written).
        base = rows.new_empty((3 * (count + len(new)) // 2, *rows.shape[1:]))
        base[:count] = rows
        base[count : count + len(new)] = new
    # How far this tensor is written: an attribute of our own, which Tensor's type does not declare
    setattr(base, "written", count + len(new))  # noqa: B010
    return base[: count + len(new)]


def take_checkpoint_sizes(module: nn.Module, state_dict: dict, prefix: str, names) -> None:
    """Buffers that grow with the edits (`appended`) take the size and dtype a checkpoint holds for
    them, before `load_state_dict` copies into them."""
    for name in names:
        if prefix + name in state_dict:
            setattr(module, name, torch.empty_like(state_dict[prefix + name]))


@torch.no_grad()
def strongest_directions(
    rotation: torch.Tensor, change: torch.Tensor, bias: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `count` strongest directions of the map h -> R^T (C h + c) (rotation R [r, d] with
    orthonormal rows, change C [r, d], bias c [r]), in the same form: (R', C', c') with R'
    [count, d] orthonormal rows. The truncated SVD of [C | c] = U S V^T: R' = U^T R, [C' | c'] =
    S V^T, best in the least-squares sense over inputs [h, 1]. Computed in fp64."""
    _, d = change.shape
    left, strength, right = torch.linalg.svd(torch.cat([change, bias.unsqueeze(1)], 1).double(), full_matrices=False)
    rows = strength[:count, None] * right[:count]
    new_rotation = left[:, :count].T @ rotation.double()
    return new_rotation.to(rotation), rows[:, :d].to(change), rows[:, d].to(bias)


class SealedBases(nn.Module):
    # Buffers: the rows of all sealed bases (`_ROWS`, `_BIASES`), and the gates' cutoff
    rotation: torch.Tensor
    change_weight: torch.Tensor
    gate_weight: torch.Tensor
    change_bias: torch.Tensor
    gate_bias: torch.Tensor
    cutoff: torch.Tensor

    def __init__(self, hidden_size: int, cutoff: float, use_gates: bool = True, sealed_rank: int | None = None):
        """`sealed_rank`: how many bases each sealed block keeps (`strongest_directions`); None:
        all it has. Blocks that keep their gates keep all their bases (each gate is a basis')."""
        super().__init__()
        self.hidden_size = hidden_size
        # False: a routed block acts with every basis at full weight (routing.py decides alone).
        self.use_gates = use_gates
        self.sealed_rank = None if use_gates else sealed_rank
        # Without gates a basis is held in fp16 (half the memory an edit; the model computes in
        # bf16, coarser still) and computed in fp32. A gate's logit is cut at `cutoff`, which a
        # rounded weight would move: gated bases stay fp32.
        dtype = torch.float32 if use_gates else torch.float16
        for name in _ROWS:
            self.register_buffer(name, torch.zeros(0, hidden_size, dtype=dtype))
        for name in _BIASES:
            self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self.register_buffer("cutoff", torch.tensor(float(cutoff)))

    @property
    def num_bases(self) -> int:
        return self.rotation.shape[0]

    @property
    def num_values(self) -> int:
        """Stored numbers of all sealed bases."""
        return sum(getattr(self, name).numel() for name in _ROWS + _BIASES)

    @property
    def num_bytes(self) -> int:
        """The memory the sealed bases cost, as held."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in _ROWS + _BIASES)

    def bases_of(self, rank: int) -> int:
        """How many bases a sealed block of `rank` keeps."""
        return rank if self.sealed_rank is None else min(rank, self.sealed_rank)

    @torch.no_grad()
    def append(self, block: BasisIntervention) -> None:
        """Freeze a block's bases, or its `sealed_rank` strongest directions (`appended`: an
        adapter forked before this call, such as an older published version, keeps its own
        bases)."""
        rotation, bias = block.R.detach(), block.source.bias.detach()
        change = block.source.weight.detach() - rotation
        kept = self.bases_of(block.rank)
        if kept < block.rank:
            rotation, change, bias = strongest_directions(rotation, change, bias, kept)
        new = {"rotation": rotation, "change_weight": change, "change_bias": bias}
        if self.use_gates:
            new |= {"gate_weight": block.gate.weight.detach(), "gate_bias": block.gate.bias.detach()}
        for name, value in new.items():
            current = getattr(self, name)
            setattr(self, name, appended(current, value.to(current)))

    def weights(self, gate_inputs: torch.Tensor, bases: torch.Tensor | None = None) -> torch.Tensor:
        """w [n, bases] (or only the columns `bases`) with gates below the cutoff exactly 0."""
        gate_weight, gate_bias = self.gate_weight, self.gate_bias
        if bases is not None:
            gate_weight, gate_bias = gate_weight[bases], gate_bias[bases]
        w = torch.sigmoid(gate_inputs @ gate_weight.T + gate_bias)
        return w * (w > self.cutoff)

    def forward(
        self, h: torch.Tensor, gate_inputs: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed change of all sealed bases at h [n, d] (fp32), and their weights [n, bases].
        `gate_inputs` is h as the gates read it: every block of a layer shares the trainable
        block's standardisation (`BasisIntervention.gate_inputs`), computed once by the caller.
        `candidates` [n, bases] (routing) says which bases may act at each position: with
        `use_gates` their gates decide (the others' are not even computed), without it they act
        at full weight. Without `candidates` every basis is a candidate."""
        n = h.shape[0]
        if self.num_bases == 0:
            return torch.zeros_like(h), h.new_zeros(n, 0)
        if candidates is None:
            candidates = torch.ones(n, self.num_bases, dtype=torch.bool, device=h.device)
        if self.use_gates:
            w = h.new_zeros(n, self.num_bases)
            columns = candidates.any(0).nonzero().squeeze(1)
            if columns.numel():
                w[:, columns] = self.weights(gate_inputs, columns) * candidates[:, columns]
        else:
            w = candidates.to(h.dtype)
        open_bases = w.detach().amax(0).nonzero().squeeze(1)
        if open_bases.numel() == 0:
            return torch.zeros_like(h), w
        coordinates = h @ self.change_weight[open_bases].to(h.dtype).T + self.change_bias[open_bases].to(h.dtype)
        return (coordinates * w[:, open_bases]) @ self.rotation[open_bases].to(h.dtype), w

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        take_checkpoint_sizes(self, state_dict, prefix, _ROWS + _BIASES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
