"""DiffusionNFT as pure functions: rewards -> optimality probabilities, the NFT loss, the sampling-policy
soft update, and the optional group filter and prompt retirement.

Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
https://arxiv.org/abs/2509.16117. Group filtering and prompt retirement follow Edit-R1 / UniWorld-V2
(https://arxiv.org/abs/2510.16888). Conventions as in docs/design.md: x_t = (1 - t) x0 + t eps, the
policy predicts v = eps - x0, so x0 = x_t - t v.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

Stats = dict[str, float]


@dataclass(frozen=True)
class NftHyper:
    """The constants of the NFT update (rl.* in the config)."""

    beta: float = 1.0  # how far v+ / v- sit from the sampling policy
    adv_max: float = 5.0  # A_max: advantages are clipped to [-A_max, A_max]
    kl_coef: float = 1e-4  # weight of ||v_theta - v_ref||^2


def group_advantages(rewards: np.ndarray, group_ids: Sequence[str], std_eps: float = 1e-4,
                     std_keys: Sequence[str] | None = None) -> tuple[np.ndarray, Stats]:
    """A = (R - mean over the sample's prompt group) / (std + std_eps).

    rewards: (B,) combined rewards; group_ids: B prompt ids (the K samples of a prompt share one).
    The std is the "global std" of Flow-GRPO / DiffusionNFT, over the whole batch: one scale for every
    group, so a group whose samples barely differ gets advantages near 0 instead of blown-up noise.
    std_keys (B,), e.g. each sample's task, takes the std over the samples sharing a key instead:
    still global across a task's groups, but a task whose reward spreads wide no longer sets the scale
    of (and so outweighs) the others in a multi-task batch.
    """
    rewards = np.asarray(rewards, dtype=np.float64)  # (B,)
    ids = np.asarray(group_ids)
    means = np.zeros_like(rewards)  # (B,) the group mean of each sample
    for gid in np.unique(ids):
        members = ids == gid
        means[members] = rewards[members].mean()
    keys = np.zeros(len(rewards), dtype=int) if std_keys is None else np.asarray(std_keys)
    stds = np.zeros_like(rewards)  # (B,) the std each sample is scaled by
    for key in np.unique(keys):
        members = keys == key
        stds[members] = rewards[members].std()
    advantages = (rewards - means) / (stds + std_eps)  # (B,)
    return advantages, {"reward_std": float(rewards.std()), "advantage_abs_mean": float(np.abs(advantages).mean())}


def optimality_probability(advantages: np.ndarray, adv_max: float) -> np.ndarray:
    """r = clip(0.5 + 0.5 * clip(A, -A_max, A_max) / A_max, 0, 1): how likely a sample is 'positive'.

    r = 1 trains the sample fully as positive, r = 0 fully as negative, 0.5 is neutral.
    """
    clipped = np.clip(np.asarray(advantages, dtype=np.float64), -adv_max, adv_max)  # (B,)
    return np.clip(0.5 + 0.5 * clipped / adv_max, 0.0, 1.0)  # (B,)


def _adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample mean((x0_pred - x0)^2) / sg(max(mean|x0_pred - x0|, 1e-5)): (B, ...) -> (B,)."""
    error = (x0_pred - x0).flatten(1)  # (B, D)
    scale = error.abs().mean(1).clamp(min=1e-5).detach()  # (B,) stop-gradient
    return error.pow(2).mean(1) / scale  # (B,)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, v_ref: torch.Tensor | None, x0: torch.Tensor,
             x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, hyper: NftHyper) -> tuple[torch.Tensor, Stats]:
    """The DiffusionNFT objective on B rollout samples.

    v_theta (B, C, H, W) the current policy, v_old the sampling policy (no grad), v_ref the reference
    (no grad; None skips the KL term), x0 the clean rollout samples, x_t = (1 - t) x0 + t eps,
    t (B,), r (B,) optimality probabilities in [0, 1].
        v+ = beta v_theta + (1 - beta) v_old          (the implicit positive policy)
        v- = (1 + beta) v_old - beta v_theta          (the implicit negative policy)
        L  = (A_max / beta) mean_B[r L+ + (1 - r) L-] + kl_coef mean((v_theta - v_ref)^2)
    with L+- the adaptively weighted x0 regression of x0+- = x_t - t v+-.
    """
    beta = hyper.beta
    v_old = v_old.detach()  # (B, C, H, W)
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(v_theta.dtype)  # (B, 1, 1, 1)
    v_pos = beta * v_theta + (1 - beta) * v_old  # (B, C, H, W)
    v_neg = (1 + beta) * v_old - beta * v_theta  # (B, C, H, W)
    loss_pos = _adaptive_x0_loss(x_t - tb * v_pos, x0)  # (B,)
    loss_neg = _adaptive_x0_loss(x_t - tb * v_neg, x0)  # (B,)
    r = r.to(v_theta.dtype)  # (B,)
    policy = (hyper.adv_max / beta) * (r * loss_pos + (1 - r) * loss_neg).mean()  # ()
    if v_ref is not None:
        kl = (v_theta - v_ref.detach()).pow(2).flatten(1).mean(1).mean()  # ()
    else:
        kl = torch.zeros((), dtype=v_theta.dtype, device=v_theta.device)  # ()
    loss = policy + hyper.kl_coef * kl  # ()
    return loss, {"loss": float(loss.detach()), "policy_loss": float(policy.detach()), "kl": float(kl.detach()),
                  "loss_pos": float(loss_pos.detach().mean()), "loss_neg": float(loss_neg.detach().mean()),
                  "r_mean": float(r.detach().float().mean())}


def sampling_policy_eta(update: int, rate: float, cap: float) -> float:
    """eta after `update` soft updates: min(rate * update, cap) (DiffusionNFT: rate 0.001, cap 0.5).

    Early on eta is near 0 (the sampling policy follows theta closely); later it keeps up to `cap` of
    its old weights, which smooths the policy the rollouts come from.
    """
    return min(rate * update, cap)


@torch.no_grad()
def soft_update(old: Iterable[torch.Tensor], new: Iterable[torch.Tensor], eta: float) -> None:
    """theta_old <- eta theta_old + (1 - eta) theta, in place on `old` (matching parameter order)."""
    for o, n in zip(old, new, strict=True):
        o.mul_(eta).add_(n.detach().to(o.dtype), alpha=1.0 - eta)


def low_variance_groups(rewards: np.ndarray, group_ids: Sequence[str], min_std: float) -> set[str]:
    """Prompt groups whose rewards spread less than min_std (Edit-R1): nothing to learn from them."""
    rewards, ids = np.asarray(rewards, dtype=np.float64), np.asarray(group_ids)
    return {str(g) for g in np.unique(ids) if rewards[ids == g].std() < min_std}


@dataclass
class PromptRetirement:
    """Retires prompts the policy has solved: group mean above `threshold` for `patience` epochs in a row.

    A retired prompt is not sampled again. State is plain JSON (checkpointed with the run).
    """

    threshold: float
    patience: int = 2
    streak: dict[str, int] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)

    def observe(self, group_means: dict[str, float]) -> list[str]:
        """Record one epoch's group means; returns the prompts retired by it."""
        newly = []
        for prompt, mean in group_means.items():
            self.streak[prompt] = self.streak.get(prompt, 0) + 1 if mean > self.threshold else 0
            if self.streak[prompt] >= self.patience and prompt not in self.retired:
                self.retired.add(prompt)
                newly.append(prompt)
        return newly

    def state(self) -> dict:
        return {"streak": dict(self.streak), "retired": sorted(self.retired)}

    def load(self, state: dict) -> None:
        self.streak, self.retired = dict(state["streak"]), set(state["retired"])


class NoRetirement:
    """PromptRetirement's stand-in when rl.retire_threshold is unset: nothing is retired, nothing is checkpointed."""

    retired: frozenset[str] = frozenset()

    def observe(self, group_means: dict[str, float]) -> list[str]:
        return []

    def state(self) -> None:
        return None

    def load(self, state: dict | None) -> None:
        pass
