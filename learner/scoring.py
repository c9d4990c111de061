"""An rl epoch's rewards -> advantages -> optimality probabilities, on its Experiences (pure, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from learner.nft import group_advantages, low_variance_groups, optimality_probability
from posterrl.experience import Experience, RlSample


@dataclass
class EpochScores:
    """What scoring an epoch decided, beside the advantages and r it wrote into the Experiences.

    samples:         what the learner trains on, in group order then sample order
    dropped_samples: samples without a reward, plus the scored samples of groups left with fewer than two
    filtered_groups: prompt ids (sorted) whose rewards spread less than rl.min_group_std: not trained on
    stats:           reward_std, advantage_abs_mean (group_advantages) and r_mean of the trained samples;
                     empty when nothing could be scored
    """

    samples: list[RlSample]
    dropped_samples: int
    filtered_groups: list[str]
    stats: dict[str, float]


def score_epoch(experiences: list[Experience], adv_max: float, min_group_std: float | None,
                advantage_std: str = "batch") -> EpochScores:
    """Rewards -> advantages (group mean, global or per-task std) -> r, written into each Experience.

    Samples without a reward are dropped, and so is a group left with fewer than two scored samples
    (nothing to compare); with min_group_std, groups that barely spread are marked filtered.
    """
    ids, tasks, values, where = [], [], [], []
    dropped = 0
    for g, experience in enumerate(experiences):
        experience.advantages = np.full_like(experience.reward, np.nan)  # (K,)
        experience.r = np.full_like(experience.reward, np.nan)  # (K,)
        experience.filtered = False
        valid = np.flatnonzero(np.isfinite(experience.reward))
        dropped += len(experience.reward) - len(valid)
        if len(valid) < 2:  # a group needs two scored samples to compare
            dropped += len(valid)
            continue
        for index in valid:
            ids.append(experience.prompt_id)
            tasks.append(experience.task)
            values.append(experience.reward[index])
            where.append((g, int(index)))
    if not values:
        return EpochScores([], dropped, [], {})
    rewards = np.asarray(values)  # (B,) every scored sample of the epoch
    advantages, stats = group_advantages(rewards, ids, std_keys=tasks if advantage_std == "task" else None)
    r = optimality_probability(advantages, adv_max)  # (B,)
    filtered = sorted(low_variance_groups(rewards, ids, min_group_std)) if min_group_std is not None else []
    for (g, k), a, prob in zip(where, advantages, r, strict=True):
        experiences[g].advantages[k], experiences[g].r[k] = a, prob
    for experience in experiences:
        experience.filtered = experience.prompt_id in filtered
    samples = [s for experience in experiences for s in experience.training_samples()]
    stats["r_mean"] = float(np.mean([s.r for s in samples])) if samples else float("nan")
    return EpochScores(samples, dropped, filtered, stats)
