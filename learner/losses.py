"""Losses as pure functions: (tensors, hyperparameters) -> (loss, stats).

Shapes: B samples of images (B, C, H, W), or of any latents (B, ...): every loss averages over all but the
first axis. Stats are detached Python floats for logging.
"""

from __future__ import annotations

import torch

Stats = dict[str, float]


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over samples of weight * (per-sample mean square error): (B, ...) twice, weight (B,) or None -> ()."""
    per_sample = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)  # (B,)
    return per_sample.mean()  # ()


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                       weight: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """Rectified-flow / flow-matching regression onto the velocity eps - x0.

    Lipman et al. 2023, "Flow Matching for Generative Modeling", https://arxiv.org/abs/2210.02747;
    with x_t = (1 - t) x0 + t eps (Liu et al. 2023, https://arxiv.org/abs/2209.03003).
    weight (B,), when given, scales each sample's error: an x0-predicting policy passes t^2
    (`Policy.loss_weight`), which turns the velocity error (x0 - x0_hat) / t back into the x0 error.
    """
    target = eps - x0  # (B, C, H, W)
    loss = _weighted_mse(v_pred, target, weight)  # ()
    return loss, {"loss": loss.item(), "fm_loss": loss.item()}


def distillation_loss(v_student: torch.Tensor, v_expert: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                      lambda_expert: float, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """Task distillation (PosterOmni, https://arxiv.org/abs/2602.12127): flow matching on data plus
    lambda_E * ||v_student - v_expert||^2, v_expert from the expert that owns each sample's regime.
    weight (B,) scales both terms per sample, as in flow_matching_loss.
    """
    fm, _ = flow_matching_loss(v_student, x0, eps, weight)  # ()
    match = _weighted_mse(v_student, v_expert.detach(), weight)  # ()
    loss = fm + lambda_expert * match  # ()
    return loss, {"loss": loss.item(), "fm_loss": fm.item(), "distill_loss": match.item()}


def pick_expert_velocity(v_local: torch.Tensor, v_global: torch.Tensor, is_global: torch.Tensor) -> torch.Tensor:
    """Per sample, the velocity of the expert owning its regime. is_global: (B,) bool."""
    return torch.where(is_global.view(-1, *([1] * (v_local.dim() - 1))), v_global, v_local)  # (B, C, H, W)
