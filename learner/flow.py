"""Drawing the flow-matching training inputs (docs/design.md: x_t = (1 - t) x0 + t eps)."""

from __future__ import annotations

import torch


def mix(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps for x0, eps (B, C, H, W) and t (B,)."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return (1 - tb) * x0 + tb * eps  # (B, C, H, W)


def draw_flow_inputs(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 (B, C, H, W) -> x_t (B, C, H, W), t (B,) ~ U(0, 1), eps (B, C, H, W) ~ N(0, I); all from `generator`."""
    t = torch.rand(x0.shape[0], generator=generator).to(x0)  # (B,)
    eps = torch.randn(x0.shape, generator=generator).to(x0)  # (B, C, H, W)
    return mix(x0, t, eps), t, eps


def draw_grid_flow_inputs(x0: torch.Tensor, grid: torch.Tensor,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As draw_flow_inputs, but t is drawn uniformly from `grid` (G,): the rollout sampler's time steps.

    DiffusionNFT trains at the timesteps its rollouts visited, so the update lands where the sampler
    evaluates the policy.
    """
    index = torch.randint(len(grid), (x0.shape[0],), generator=generator)  # (B,)
    t = grid[index].to(x0)  # (B,)
    eps = torch.randn(x0.shape, generator=generator).to(x0)  # (B, C, H, W)
    return mix(x0, t, eps), t, eps
