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

import torch

from posterrl.flow import SamplerConfig, flow_sigmas
from posterrl.policy import Condition, EditPolicy

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
def sample(policy: EditPolicy, cond: Condition, noise: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """Integrate from noise (B, 3, R, R) at t = 1 to images (B, 3, R, R) in [-1, 1] at t = 0."""
    step = SOLVERS[config.solver]
    sigmas = flow_sigmas(config.num_steps, config.shift).tolist()
    batch = noise.shape[0]

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return policy.velocity(x, torch.full((batch,), sigma, dtype=x.dtype, device=x.device), cond)

    x = noise.to(cond.text.device, cond.text.dtype)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = step(velocity, x, sigma, sigma_next)
    return x.clamp(-1.0, 1.0)


@dataclass
class SampledGroups:
    """K samples for each of G prompts.

    images:  (G, K, 3, R, R) in [-1, 1], canvases as the policy sees them
    seeds:   (G,) the noise seed of each prompt group
    sigmas:  (S + 1,) the time grid used
    """

    images: torch.Tensor
    seeds: list[int]
    sigmas: torch.Tensor


@torch.no_grad()
def sample_groups(policy: EditPolicy, instructions: list[str], inputs: torch.Tensor, seeds: list[int],
                  group_size: int, config: SamplerConfig) -> SampledGroups:
    """G prompts (instructions, input canvases (G, N, 3, R, R)) -> K samples each."""
    input_ids, mask = policy.tokenize(instructions)
    cond = policy.encode_condition(input_ids, mask, inputs.to(input_ids.device)).repeat_interleave(group_size)
    r = policy.spec.resolution
    noise = group_noise(seeds, group_size, (3, r, r))  # (G*K, 3, R, R)
    images = sample(policy, cond, noise, config)
    return SampledGroups(
        images=images.reshape(len(seeds), group_size, 3, r, r).cpu(),
        seeds=list(seeds),
        sigmas=flow_sigmas(config.num_steps, config.shift),
    )
