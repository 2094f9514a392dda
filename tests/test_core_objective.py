"""The training objective: cross-entropy, incremental load balancing, locality margins."""
from __future__ import annotations

import math

import pytest
import torch

from baft_core.objective import continuation_drift, load_balance, locality_margin, target_cross_entropy


def test_target_cross_entropy_value():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    first = -(2.0 - math.log(math.exp(2.0) + 1 + math.exp(-1.0)))
    second = math.log(3.0)
    assert target_cross_entropy(logits, targets).item() == pytest.approx((first + second) / 2, rel=1e-6)
    # half precision logits are computed in fp32
    assert target_cross_entropy(logits.half(), targets).dtype == torch.float32


def test_load_balance_zero_for_uniform_positive_otherwise():
    uniform = torch.full((2, 4), 0.3)
    assert load_balance(uniform, torch.zeros(2, 4), 0).item() == pytest.approx(0.0, abs=1e-6)
    # uniform history plus uniform current usage: still balanced
    assert load_balance(uniform, torch.full((2, 4), 0.6), 2).item() == pytest.approx(0.0, abs=1e-6)
    skewed = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.3, 0.3, 0.3, 0.3]])
    value = load_balance(skewed, torch.zeros(2, 4), 0)
    assert value.item() > 0.1
    # hand computed squared coefficient of variation, averaged over layers
    row = skewed[0]
    cv2 = row.var(unbiased=False) / row.mean() ** 2
    assert value.item() == pytest.approx((cv2.item() + 0.0) / 2, rel=1e-4)


def test_load_balance_counts_history_and_grads_only_current():
    current = torch.full((1, 4), 0.25, requires_grad=True)
    # history skewed towards basis 0: a balanced current edit does not hide it
    history = torch.tensor([[3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    value = load_balance(current, history, 3)
    assert value.item() > 0.5
    value.backward()
    assert history.grad is None
    assert current.grad is not None and current.grad.abs().sum() > 0
    # the gradient pushes basis 0 (over-used) down and the others up
    assert current.grad[0, 0] > 0 and (current.grad[0, 1:] < 0).all()


def test_locality_margin_zero_when_satisfied():
    alpha, beta, gamma = 0.01, 0.05, 0.02
    edit = torch.full((3, 4), 4.0)  # sigmoid ~0.98 >= beta
    unrelated = torch.full((5, 4), -8.0)  # sigmoid ~3e-4 <= alpha
    assert locality_margin(edit, unrelated, alpha, beta, gamma).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    "edit_value, unrelated_value",
    [(4.0, 0.0), (-6.0, -8.0), (-3.0, -3.0)],
    ids=["unrelated-open", "edit-closed", "no-gap"],
)
def test_locality_margin_positive_when_violated(edit_value, unrelated_value):
    edit = torch.full((3, 4), edit_value, requires_grad=True)
    unrelated = torch.full((5, 4), unrelated_value, requires_grad=True)
    loss = locality_margin(edit, unrelated, 0.01, 0.05, 0.02)
    assert loss.item() > 0
    loss.backward()
    # violations give a gradient: the hinge is on logits, so it does not vanish with the sigmoid
    total = edit.grad.abs().sum() + unrelated.grad.abs().sum()
    assert total > 1e-3


def test_locality_margin_gradient_directions():
    edit = torch.full((2, 3), -6.0, requires_grad=True)  # closed: must open
    unrelated = torch.full((2, 3), 1.0, requires_grad=True)  # open: must close
    locality_margin(edit, unrelated, 0.01, 0.05, 0.02).backward()
    assert (edit.grad <= 0).all() and edit.grad.sum() < 0  # descent raises edit logits
    assert (unrelated.grad >= 0).all() and unrelated.grad.sum() > 0  # descent lowers unrelated


def test_continuation_drift_is_the_kl_from_the_unedited_prediction():
    unedited = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]), -1)
    assert continuation_drift(unedited, unedited).abs() < 1e-7
    edited = torch.log_softmax(torch.tensor([[-1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]), -1)
    p = unedited[0].exp()
    expected = (p * (unedited[0] - edited[0])).sum() / 2  # mean over the two positions
    assert torch.allclose(continuation_drift(edited, unedited), expected)
