"""The flow-matching time grid and the sampler settings, shared by the sampler (rollouts), the learner (NFT
timesteps) and the policy spec (each exported policy's default sampler)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


@dataclass(frozen=True)
class SamplerConfig:
    """How the flow ODE is integrated: the config's rollout.solver/num_steps/shift, and the default saved
    with every exported policy (the `sampler` key of posterrl_policy.json)."""

    solver: str = "euler"  # a key of rollout.sampler.SOLVERS (posterrl.names.SOLVER_NAMES)
    num_steps: int = 8
    shift: float = 1.0  # timestep shift of FlowMatchEulerDiscreteScheduler

    @classmethod
    def from_rollout(cls, rollout: Any) -> SamplerConfig:
        """The sampler a config's `rollout` section asks for."""
        return cls(rollout.solver, rollout.num_steps, rollout.shift)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SamplerConfig:
        """From a saved spec's `sampler` mapping (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The scheduler's sigma grid, (num_steps + 1,), from 1 down to 0 (the appended terminal)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float().cpu()
