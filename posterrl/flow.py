"""The flow-matching time grid, shared by the sampler (rollouts) and the learner (NFT timesteps)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The scheduler's sigma grid, (num_steps + 1,), from 1 down to 0 (the appended terminal)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float().cpu()
