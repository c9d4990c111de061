"""Bradley-Terry preference losses for reward models, as pure functions.

Bradley & Terry (1952), "Rank analysis of incomplete block designs": P(w > l) = sigmoid(r_w - r_l).
Ties: Rao & Kupper (1967), "Ties in paired-comparison experiments: a generalization of the
Bradley-Terry model" (https://doi.org/10.1080/01621459.1967.10482901), with a threshold theta > 1:
    P(w > l) = e^{r_w} / (e^{r_w} + theta e^{r_l}) = sigmoid(r_w - r_l - log theta)
    P(tie)   = (theta^2 - 1) e^{r_w} e^{r_l} / ((e^{r_w} + theta e^{r_l}) (e^{r_l} + theta e^{r_w}))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, tie: torch.Tensor, margin: float = 0.0,
                       ties: str = "skip", theta: float = 1.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative log-likelihood of B preference pairs; `tie` marks pairs judged equal.

    ties="skip": ties are masked out, the loss is -log sigmoid(r_w - r_l - margin) over the rest.
    ties="rao_kupper": wins use -log sigmoid(r_w - r_l - log theta - margin), ties -log P(tie).
    """
    diff = r_chosen - r_rejected  # (B,)
    decided = ~tie  # (B,) bool
    if ties == "skip":
        per_pair = -F.logsigmoid(diff - margin)  # (B,)
        weight = decided.to(diff.dtype)  # (B,) 1 for counted pairs
    elif ties == "rao_kupper":
        log_theta = math.log(theta)
        win = -F.logsigmoid(diff - log_theta - margin)  # (B,)
        log_p_tie = (math.log(theta**2 - 1) + r_chosen + r_rejected  # (B,) log of P(tie), stable form
                     - torch.logaddexp(r_chosen, r_rejected + log_theta)
                     - torch.logaddexp(r_rejected, r_chosen + log_theta))
        per_pair = torch.where(decided, win, -log_p_tie)  # (B,)
        weight = torch.ones_like(diff)  # (B,) every pair counts
    else:
        raise ValueError(f"ties={ties!r}: expected 'skip' or 'rao_kupper'")
    # (diff * 0).sum() keeps a graph when every pair is a skipped tie, so backward still runs on all ranks.
    loss = (per_pair * weight).sum() / weight.sum().clamp(min=1) + (diff * 0).sum()  # ()
    n_decided = int(decided.sum())
    accuracy = float((diff[decided] > 0).float().mean()) if n_decided else float("nan")
    return loss, {"loss": float(loss.detach()), "accuracy": accuracy, "reward_margin": float(diff.detach().mean()),
                  "ties": float(tie.sum())}
