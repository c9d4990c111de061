"""Bradley-Terry losses against numbers derived by hand."""

import math

import pytest
import torch

from learner.bt_loss import bradley_terry_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_plain_bradley_terry_by_hand():
    # r_w - r_l = 0: -log sigmoid(0) = log 2.  r_w - r_l = ln 3: sigmoid = 3/4, loss = log(4/3).
    loss, stats = bradley_terry_loss(t(0.0, math.log(3)), t(0.0, 0.0), torch.tensor([False, False]))
    assert float(loss) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert stats["accuracy"] == 0.5  # 0 > 0 is not a win
    assert stats["reward_margin"] == pytest.approx(math.log(3) / 2)


def test_margin_shifts_the_difference():
    # r_w - r_l = ln 3 + 1 with margin 1 is the ln 3 case again: log(4/3).
    loss, _ = bradley_terry_loss(t(math.log(3) + 1), t(0.0), torch.tensor([False]), margin=1.0)
    assert float(loss) == pytest.approx(math.log(4 / 3))


def test_skipped_ties_do_not_count():
    loss, stats = bradley_terry_loss(t(0.0, 5.0), t(0.0, -5.0), torch.tensor([False, True]))
    assert float(loss) == pytest.approx(math.log(2))
    assert stats["ties"] == 1 and stats["accuracy"] == 0.0
    chosen = t(1.0).requires_grad_()
    all_ties, _ = bradley_terry_loss(chosen, t(0.0), torch.tensor([True]))
    all_ties.backward()  # a batch of only ties still backpropagates (zero gradient)
    assert float(all_ties) == 0.0 and float(chosen.grad) == 0.0


def test_rao_kupper_by_hand():
    # theta = 2, r_w = r_l: P(w>l) = 1/(1+2) = 1/3, P(tie) = 3 * 1 / (3 * 3) = 1/3.
    win, _ = bradley_terry_loss(t(0.0), t(0.0), torch.tensor([False]), ties="rao_kupper", theta=2.0)
    tie, _ = bradley_terry_loss(t(0.0), t(0.0), torch.tensor([True]), ties="rao_kupper", theta=2.0)
    assert float(win) == pytest.approx(math.log(3))
    assert float(tie) == pytest.approx(math.log(3))
    # theta = 2, r_w = ln 2, r_l = 0: P(w>l) = 2/(2+2) = 1/2; P(tie) = 3*2 / ((2+2)(1+4)) = 6/20.
    win, _ = bradley_terry_loss(t(math.log(2)), t(0.0), torch.tensor([False]), ties="rao_kupper", theta=2.0)
    tie, _ = bradley_terry_loss(t(math.log(2)), t(0.0), torch.tensor([True]), ties="rao_kupper", theta=2.0)
    assert float(win) == pytest.approx(math.log(2))
    assert float(tie) == pytest.approx(-math.log(6 / 20))


def test_rao_kupper_is_stable_for_large_rewards():
    loss, _ = bradley_terry_loss(t(500.0), t(500.0), torch.tensor([True]), ties="rao_kupper", theta=2.0)
    assert float(loss) == pytest.approx(math.log(3))


def test_gradient_pushes_chosen_up():
    chosen, rejected = t(0.0).requires_grad_(), t(0.0).requires_grad_()
    loss, _ = bradley_terry_loss(chosen, rejected, torch.tensor([False]))
    loss.backward()
    assert float(chosen.grad) == pytest.approx(-0.5) and float(rejected.grad) == pytest.approx(0.5)
