import math

import pytest
import torch

from posterrl.flow import SamplerConfig, flow_sigmas
from rollout.sampler import SOLVERS, euler_step, group_noise, heun_step, prompt_seed, sample_groups


def test_sigmas_follow_the_scheduler():
    sigmas = flow_sigmas(4, shift=1.0)
    assert sigmas.shape == (5,)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    # shift > 1 spends more of the grid at high noise
    assert flow_sigmas(4, shift=3.0)[2] > sigmas[2]


def test_euler_and_heun_by_hand():
    # dx/dsigma = x from sigma=1 to 0.5 with x=2: Euler 2 + (-0.5)*2 = 1;
    # Heun: predictor 1, slope there 1, x = 2 - 0.5 * (2 + 1) / 2 = 1.25. Exact: 2 e^-0.5 = 1.2131.
    def velocity(x, sigma):
        return x

    x = torch.tensor([2.0])
    assert euler_step(velocity, x, 1.0, 0.5).item() == pytest.approx(1.0)
    assert heun_step(velocity, x, 1.0, 0.5).item() == pytest.approx(1.25)
    assert abs(heun_step(velocity, x, 1.0, 0.5).item() - 2 * math.exp(-0.5)) < abs(1.0 - 2 * math.exp(-0.5))
    # into sigma = 0 Heun stays first order
    assert heun_step(velocity, x, 0.5, 0.0).item() == pytest.approx(euler_step(velocity, x, 0.5, 0.0).item())


def test_straight_path_is_exact_for_any_solver():
    # A velocity that is exactly eps - x0 along a straight path takes every solver to x0.
    x0, eps = torch.tensor([0.3, -0.7]), torch.tensor([1.5, 0.2])
    for step in SOLVERS.values():
        x = eps.clone()
        sigmas = flow_sigmas(5, 1.0).tolist()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = step(lambda _x, _s: eps - x0, x, s, s_next)
        assert torch.allclose(x, x0, atol=1e-6)


def test_group_noise_is_per_prompt():
    a = group_noise([1, 2], 3, (2, 4, 4))
    b = group_noise([2], 3, (2, 4, 4))
    assert a.shape == (6, 2, 4, 4)
    assert torch.equal(a[3:], b)
    assert not torch.equal(a[0], a[1])
    assert prompt_seed(0, "x") == prompt_seed(0, "x") != prompt_seed(1, "x")


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampling_is_deterministic_with_documented_shapes(tiny_policy, solver):
    r = tiny_policy.spec.resolution
    inputs = torch.rand(2, 1, 3, r, r) * 2 - 1
    config = SamplerConfig(solver=solver, num_steps=3)
    a = sample_groups(tiny_policy, ["Extend this poster.", "Fill it."], inputs, [5, 6], 3, config)
    b = sample_groups(tiny_policy, ["Extend this poster.", "Fill it."], inputs, [5, 6], 3, config)
    assert a.images.shape == (2, 3, 3, r, r)
    assert torch.equal(a.images, b.images)
    assert a.images.min() >= -1 and a.images.max() <= 1
    assert a.sigmas.shape == (4,)
    # K samples of a group differ (different noise); another seed changes the samples
    assert not torch.equal(a.images[0, 0], a.images[0, 1])
    c = sample_groups(tiny_policy, ["Extend this poster.", "Fill it."], inputs, [7, 6], 3, config)
    assert not torch.equal(a.images[0], c.images[0])
    assert torch.allclose(a.images[1], c.images[1], atol=1e-5)
