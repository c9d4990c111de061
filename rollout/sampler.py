"""Deterministic flow-matching ODE sampling, without gradients (`@torch.no_grad()`).

Convention (docs/design.md): x_t = (1 - t) x0 + t eps, the policy predicts v = eps - x0, so the ODE
dx/dt = v runs from t = 1 (noise) to t = 0 (image). The time grid is the sigma schedule of
diffusers' FlowMatchEulerDiscreteScheduler (its `shift` included), so rollouts and the training
timesteps taken from them agree with what real Flux/Qwen-Image pipelines use. CFG-free.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from posterrl.flow import SamplerConfig
from posterrl.policy import Policy

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def euler_step(velocity: VelocityFn, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """First order: x + (sigma_next - sigma) v(x, sigma). One model call."""
    return x + (sigma_next - sigma) * velocity(x, sigma)


def heun_step(velocity: VelocityFn, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Second order (Heun / trapezoid): Euler predictor, then the average of both slopes.

    As in Karras et al. 2022 (EDM, Alg. 1), the step into sigma = 0 stays first order, so N steps
    cost 2N - 1 model calls.
    """
    v = velocity(x, sigma)
    x_euler = x + (sigma_next - sigma) * v
    if sigma_next == 0:
        return x_euler
    return x + (sigma_next - sigma) * 0.5 * (v + velocity(x_euler, sigma_next))


# One step function per name of posterrl.names.SOLVER_NAMES (the config's rollout.solver choices).
SOLVERS: dict[str, Callable[[VelocityFn, torch.Tensor, float, float], torch.Tensor]] = {
    "euler": euler_step,
    "heun": heun_step,
}


def prompt_seed(base_seed: int, prompt_id: str) -> int:
    """A noise seed fixed by (run seed, prompt id), whatever batch the prompt lands in."""
    return zlib.crc32(f"{base_seed}:{prompt_id}".encode()) & 0x7FFFFFFF


def group_noise(seeds: list[int], group_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Start noise (G * K, *shape): group g's K samples drawn in order from Generator(seeds[g])."""
    chunks = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        chunks.append(torch.randn((group_size, *shape), generator=generator))
    return torch.cat(chunks)


@torch.no_grad()
def sample(policy: Policy, cond: Any, noise: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """Integrate from noise (B, *latent_shape) at t = 1 to latents (B, *latent_shape) at t = 0, on the policy's
    own time grid (the scheduler's sigmas for a released pipeline)."""
    step = SOLVERS[config.solver]
    sigmas = policy.time_grid(config).tolist()
    batch = noise.shape[0]
    weight = next(policy.parameters())

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return policy.velocity(x, torch.full((batch,), sigma, dtype=x.dtype, device=x.device), cond)

    x = noise.to(weight.device, weight.dtype)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = step(velocity, x, sigma, sigma_next)
    return x


@dataclass
class SampledGroups:
    """K samples for each of G prompts.

    images:  (G, K, 3, R, R) in [-1, 1], canvases as the policy sees them
    latents: (G, K, *latent_shape) what the sampler produced, the NFT update's x0; None for a pixel-space policy
             (the images are the latents)
    seeds:   (G,) the noise seed of each prompt group
    sigmas:  (S + 1,) the time grid used
    """

    images: torch.Tensor
    latents: torch.Tensor | None
    seeds: list[int]
    sigmas: torch.Tensor


@torch.no_grad()
def sample_groups(policy: Policy, instructions: list[str], inputs: torch.Tensor, seeds: list[int],
                  group_size: int, config: SamplerConfig) -> SampledGroups:
    """G prompts (instructions, input canvases (G, N, 3, R, R)) -> K samples each."""
    cond = policy.condition(*policy.prepare(instructions, inputs)).repeat_interleave(group_size)
    noise = group_noise(seeds, group_size, policy.latent_shape)  # (G*K, *latent_shape)
    latents = sample(policy, cond, noise, config)  # (G*K, *latent_shape)
    group_inputs = inputs.repeat_interleave(group_size, 0).to(latents.device)  # (G*K, N, 3, R, R)
    images = policy.decode_latents(latents, group_inputs)  # (G*K, 3, R, R)
    g = len(seeds)
    return SampledGroups(
        # float32 whatever the policy samples in (rollout.dtype): rewards, the learner and PNGs read these
        images=images.reshape(g, group_size, *images.shape[1:]).float().cpu(),
        latents=None if policy.pixel_space else latents.reshape(g, group_size, *policy.latent_shape).float().cpu(),
        seeds=list(seeds),
        sigmas=policy.time_grid(config),
    )
