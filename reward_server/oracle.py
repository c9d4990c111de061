"""The gold oracle: the task's gold metric against the row's target, as a reward.

A measuring instrument, not a reward for real jobs: it needs a target for every prompt (the procedural
posters have one; a user's prompts usually do not) and it is the very metric held-out evaluation reports,
so RL on it says how far the policy and the NFT update could go with a perfect reward, next to the
learned one (docs/rl.md). A sample without a target scores NaN, which the registry drops and counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from posterrl.data.gold import gold_metric
from posterrl.models.samples import EditSample
from reward_server.types import ScoreBatch


class GoldOracleScorer:
    kind = "gold_oracle"
    score_range = (0.0, 1.0)

    def score(self, samples: Sequence[EditSample]) -> ScoreBatch:
        scores, details = [], []
        for sample in samples:
            if sample.target is None:
                scores.append(float("nan"))
                details.append({"reason": f"prompt {sample.prompt_id!r} has no target image"})
                continue
            scores.append(gold_metric(sample.task, sample.output, sample.target, sample.meta))
            details.append({})
        return ScoreBatch(np.asarray(scores, dtype=np.float64), details)
