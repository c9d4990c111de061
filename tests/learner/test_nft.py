"""DiffusionNFT math with numbers derived by hand."""

import math

import numpy as np
import pytest
import torch

from learner.nft import (
    NftHyper,
    PromptRetirement,
    group_advantages,
    low_variance_groups,
    nft_loss,
    optimality_probability,
    sampling_policy_eta,
    soft_update,
)


def test_group_advantages_use_group_mean_and_global_std():
    # groups a = [1, 3] (mean 2), b = [2, 2] (mean 2); batch std of [1, 3, 2, 2] = sqrt(0.5)
    advantages, stats = group_advantages(np.array([1.0, 3.0, 2.0, 2.0]), ["a", "a", "b", "b"])
    scale = math.sqrt(0.5) + 1e-4
    assert advantages == pytest.approx([-1 / scale, 1 / scale, 0.0, 0.0])
    assert stats["reward_std"] == pytest.approx(math.sqrt(0.5))


def test_global_std_is_shared_by_groups_of_different_spread():
    # a = [0, 2] (mean 1), b = [10, 10.2] (mean 10.1). Per-group std would give both groups +-1;
    # the global std (over all four) gives the quiet group b advantages 10x smaller than a's.
    rewards = np.array([0.0, 2.0, 10.0, 10.2])
    advantages, _ = group_advantages(rewards, ["a", "a", "b", "b"])
    std = rewards.std()
    assert advantages == pytest.approx([-1 / (std + 1e-4), 1 / (std + 1e-4), -0.1 / (std + 1e-4), 0.1 / (std + 1e-4)])
    assert abs(advantages[1]) == pytest.approx(10 * abs(advantages[3]))


def test_per_task_std_scales_each_task_by_its_own_spread():
    # task x: groups a = [0, 2], b = [4, 4] -> std of [0, 2, 4, 4] = sqrt(2.75); task y: group c = [10, 10.2]
    # -> std 0.1. Advantages: a -1, +1 over sqrt(2.75); c -0.1, +0.1 over 0.1 = -1, +1.
    rewards = np.array([0.0, 2.0, 4.0, 4.0, 10.0, 10.2])
    advantages, _ = group_advantages(rewards, ["a", "a", "b", "b", "c", "c"],
                                     std_keys=["x", "x", "x", "x", "y", "y"])
    sx = math.sqrt(2.75) + 1e-4
    assert advantages == pytest.approx([-1 / sx, 1 / sx, 0.0, 0.0, -0.1 / 0.1001, 0.1 / 0.1001])


def test_optimality_probability_maps_and_clips():
    # r = 0.5 + 0.5 * clip(A, -5, 5) / 5
    r = optimality_probability(np.array([0.0, 2.5, -1.0, 7.0, -12.0]), adv_max=5.0)
    assert r == pytest.approx([0.5, 0.75, 0.4, 1.0, 0.0])


def test_nft_loss_by_hand():
    # One value: x0 = 0, t = 0.5, eps = 1 -> x_t = 0.5; v_theta = 1.0, v_old = 0.8, v_ref = 0.9, beta = 1.
    # v+ = 1.0, v- = 2 * 0.8 - 1.0 = 0.6; x0+ = 0.5 - 0.5 * 1.0 = 0, x0- = 0.5 - 0.3 = 0.2.
    # L+ = 0 / max(0, 1e-5) = 0; L- = 0.2^2 / 0.2 = 0.2. r = 0.75: policy = 5 * (0.75 * 0 + 0.25 * 0.2) = 0.25.
    # KL = (1.0 - 0.9)^2 = 0.01, kl_coef 0.1 -> 0.001. Loss 0.251.
    v = torch.tensor([1.0]).view(1, 1, 1, 1).requires_grad_()
    v_old, v_ref = torch.full((1, 1, 1, 1), 0.8), torch.full((1, 1, 1, 1), 0.9)
    x0, x_t, t = torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5), torch.tensor([0.5])
    hyper = NftHyper(beta=1.0, adv_max=5.0, kl_coef=0.1)
    loss, stats = nft_loss(v, v_old, v_ref, x0, x_t, t, torch.tensor([0.75]), hyper)
    assert loss.item() == pytest.approx(0.251, abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(0.25) and stats["kl"] == pytest.approx(0.01)
    assert stats["loss_pos"] == pytest.approx(0.0) and stats["loss_neg"] == pytest.approx(0.2)
    loss.backward()
    # d x0-/dv = t * beta = 0.5; dL-/dv = 2 * 0.2 * 0.5 / 0.2 (the scale is a constant) = 1.0;
    # dL+/dv = 0 (zero error). d policy/dv = 5 * 0.25 * 1.0 = 1.25; d KL term/dv = 0.1 * 2 * 0.1 = 0.02.
    assert v.grad.item() == pytest.approx(1.27, abs=1e-6)


def test_nft_loss_beta_scales_and_batch_averages():
    # Two samples, beta = 0.5, no KL. Both: x0 = 0, t = 1, x_t = 1, v_old = 1.
    # Sample 1: v_theta = 1.2, r = 1: v+ = 0.5 * 1.2 + 0.5 * 1 = 1.1, x0+ = -0.1, L+ = 0.01 / 0.1 = 0.1.
    # Sample 2: v_theta = 0.6, r = 0: v- = 1.5 * 1 - 0.5 * 0.6 = 1.2, x0- = -0.2, L- = 0.04 / 0.2 = 0.2.
    # policy = (5 / 0.5) * mean(0.1, 0.2) = 10 * 0.15 = 1.5.
    v = torch.tensor([1.2, 0.6]).view(2, 1, 1, 1)
    ones = torch.ones(2, 1, 1, 1)
    loss, stats = nft_loss(v, ones, None, torch.zeros(2, 1, 1, 1), ones, torch.ones(2), torch.tensor([1.0, 0.0]),
                           NftHyper(beta=0.5, adv_max=5.0, kl_coef=0.0))
    assert loss.item() == pytest.approx(1.5, abs=1e-6)
    assert stats["kl"] == 0.0 and stats["r_mean"] == pytest.approx(0.5)


def test_positive_sample_pulls_the_policy_towards_it_and_negative_pushes_away():
    # With v_theta = v_old, a gradient step on an r = 1 sample lowers the x0 error of v_theta;
    # on an r = 0 sample it raises it (the policy moves away from that sample).
    g = torch.Generator().manual_seed(0)
    x0, eps, v_old = (torch.randn(1, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.6])
    x_t = (1 - t) * x0 + t * eps

    def x0_error_after_step(r: float) -> float:
        v = v_old.clone().requires_grad_()
        loss, _ = nft_loss(v, v_old, None, x0, x_t, t, torch.tensor([r]), NftHyper(kl_coef=0.0))
        loss.backward()
        with torch.no_grad():
            stepped = v - 0.01 * v.grad
            return float((x_t - t * stepped - x0).pow(2).mean())

    before = float((x_t - t * v_old - x0).pow(2).mean())
    assert x0_error_after_step(1.0) < before < x0_error_after_step(0.0)


def test_eta_schedule_and_soft_update():
    assert sampling_policy_eta(0, 0.001, 0.5) == 0.0
    assert sampling_policy_eta(100, 0.001, 0.5) == pytest.approx(0.1)
    assert sampling_policy_eta(10_000, 0.001, 0.5) == 0.5
    old, new = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    soft_update(old, new, eta=0.25)  # 0.25 * old + 0.75 * new
    assert old[0].tolist() == pytest.approx([2.5, 5.0])
    soft_update(old, new, eta=0.0)  # eta 0: the sampling policy becomes theta
    assert old[0].tolist() == [3.0, 6.0]


def test_low_variance_groups_are_found():
    rewards = np.array([0.50, 0.52, 0.1, 0.9])
    assert low_variance_groups(rewards, ["a", "a", "b", "b"], min_std=0.05) == {"a"}  # std 0.01 and 0.4


def test_prompts_retire_after_patience_epochs_above_threshold():
    retirement = PromptRetirement(threshold=0.9, patience=2)
    assert retirement.observe({"p": 0.95, "q": 0.5}) == []
    assert retirement.observe({"p": 0.92, "q": 0.95}) == ["p"]
    assert retirement.observe({"q": 0.3}) == []  # q's streak broke
    assert retirement.retired == {"p"}
    restored = PromptRetirement(threshold=0.9, patience=2)
    restored.load(retirement.state())
    assert restored.retired == {"p"} and restored.streak == {"p": 2, "q": 0}
