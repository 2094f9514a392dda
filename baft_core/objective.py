"""The training objective: target cross-entropy, incremental load balancing, locality margins,
and for blocks that act at full weight, the continuation after the answer.

The margins are hinges on the gate logits rather than on the weights: a hinge on a sigmoid output
near 0.01 has almost no gradient, while the logit keeps a unit slope, so gates keep learning."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the target tokens; `logits` [n, vocab] and `targets` [n] for the target positions."""
    return F.cross_entropy(logits.float(), targets)


def continuation_drift(edited: torch.Tensor, unedited: torch.Tensor) -> torch.Tensor:
    """KL(unedited || edited) of the next token after the answer, from log-probabilities
    [n, vocab]: what follows the new answer should be what the unedited model would say there.
    Without it an ungated block, which acts on every generated token, made greedy decoding repeat
    the answer ("actor actor actor ...")."""
    return F.kl_div(edited, unedited, log_target=True, reduction="batchmean")


def load_balance(current_usage: torch.Tensor, usage_sum: torch.Tensor, edit_count: int) -> torch.Tensor:
    """Squared coefficient of variation of each basis' running-average weight over all edits so far,
    this edit included; gradient flows only through this edit's usage [layers, rank]."""
    average = (usage_sum.detach() + current_usage) / (edit_count + 1)
    variance = average.var(dim=-1, unbiased=False)
    return (variance / (average.mean(dim=-1).pow(2) + 1e-8)).mean()


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def locality_margin(
    edit_logits: torch.Tensor,
    unrelated_logits: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """Gates on unrelated inputs <= alpha, on the edit >= beta, and the largest edit weight above
    the largest unrelated one by gamma. Inputs are gate logits [n, rank] of one layer."""
    unrelated = F.relu(unrelated_logits - _logit(alpha)).mean()
    edit = F.relu(_logit(beta) - edit_logits).mean()
    gap = torch.sigmoid(edit_logits).max() - torch.sigmoid(unrelated_logits).max()
    # Divided by gamma so that all three terms are of order one.
    return unrelated + edit + F.relu(gamma - gap) / gamma
