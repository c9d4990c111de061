import pytest
import torch

from learner.flow import draw_flow_inputs
from learner.losses import distillation_loss, flow_matching_loss, pick_expert_velocity


def test_flow_matching_by_hand():
    # One sample, two values: target = eps - x0 = [1 - 0.5, 0 - (-1)] = [0.5, 1.0];
    # v = [1.5, 1.0] -> errors [1.0, 0.0] -> mean square 0.5.
    x0 = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    eps = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    v = torch.tensor([1.5, 1.0]).view(1, 2, 1, 1)
    loss, stats = flow_matching_loss(v, x0, eps)
    assert loss.item() == pytest.approx(0.5)
    assert stats["fm_loss"] == pytest.approx(0.5)


def test_flow_matching_averages_per_sample_then_batch():
    x0 = torch.zeros(2, 1, 1, 2)
    eps = torch.zeros(2, 1, 1, 2)
    v = torch.tensor([[[[2.0, 0.0]]], [[[0.0, 0.0]]]])  # sample errors: (4 + 0) / 2 = 2 and 0
    assert flow_matching_loss(v, x0, eps)[0].item() == pytest.approx(1.0)


def test_distillation_by_hand():
    # fm: target eps - x0 = 1, v = 2 -> 1. match: (2 - 0.5)^2 = 2.25. lambda 0.5 -> 1 + 1.125 = 2.125
    x0, eps = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    v, v_expert = torch.full((1, 1, 1, 1), 2.0, requires_grad=True), torch.full((1, 1, 1, 1), 0.5)
    loss, stats = distillation_loss(v, v_expert, x0, eps, lambda_expert=0.5)
    assert loss.item() == pytest.approx(2.125)
    assert stats["fm_loss"] == pytest.approx(1.0) and stats["distill_loss"] == pytest.approx(2.25)
    loss.backward()
    # d/dv [(v - 1)^2 + 0.5 (v - 0.5)^2] = 2 (1) + 1.5 = 3.5
    assert v.grad.item() == pytest.approx(3.5)


def test_weights_scale_each_sample_by_hand():
    # Sample errors 4 and 1 (one value each). Weights [0.25, 2]: (0.25 * 4 + 2 * 1) / 2 = 1.5.
    x0, eps = torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    v = torch.tensor([2.0, 1.0]).view(2, 1, 1, 1)
    weight = torch.tensor([0.25, 2.0])
    assert flow_matching_loss(v, x0, eps, weight)[0].item() == pytest.approx(1.5)
    # match: v_expert 0 -> the same squares, weighted the same: 1.5 again; lambda 2 -> 1.5 + 3 = 4.5
    loss, stats = distillation_loss(v, torch.zeros_like(v), x0, eps, 2.0, weight)
    assert loss.item() == pytest.approx(4.5) and stats["distill_loss"] == pytest.approx(1.5)


def test_distillation_with_zero_lambda_is_flow_matching():
    g = torch.Generator().manual_seed(0)
    x0, eps, v, ve = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(4))
    assert distillation_loss(v, ve, x0, eps, 0.0)[0].item() == pytest.approx(flow_matching_loss(v, x0, eps)[0].item())


def test_expert_is_picked_per_sample():
    v_local, v_global = torch.zeros(3, 1, 1, 1), torch.ones(3, 1, 1, 1)
    picked = pick_expert_velocity(v_local, v_global, torch.tensor([False, True, False]))
    assert picked.flatten().tolist() == [0.0, 1.0, 0.0]


def test_flow_inputs_interpolate():
    x0 = torch.randn(4, 3, 8, 8)
    x_t, t, eps = draw_flow_inputs(x0, torch.Generator().manual_seed(1))
    assert t.shape == (4,) and torch.all((t >= 0) & (t <= 1))
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - tb) * x0 + tb * eps)
    again = draw_flow_inputs(x0, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x_t)
