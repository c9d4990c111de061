"""The reward stage's training task: a Bradley-Terry reward model (posterrl/models/reward_model.py) on
preference pairs (learner/bt_loss.py has the loss).

The pairs are sent once when the task starts; each step's global batch is a list of pair indices, cut
into the same per-rank shares as any other batch, so only indices travel per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from learner.bt_loss import bradley_terry_loss
from learner.tasks.base import StatelessTask, Stats
from posterrl.batch import on_device
from posterrl.config import Config
from posterrl.models.reward_model import ConvRewardModel, build_reward_model, pair_sides, save_reward_model
from posterrl.models.samples import PreferencePair
from posterrl.models.vlm_reward import VlmRewardModel


class RewardModelTask(StatelessTask):
    def __init__(self, config: Config, device: torch.device, seed: int, spec: dict,
                 pairs: list[PreferencePair]):
        rm = config.reward_model
        self.config, self.device, self.seed, self.spec, self.pairs = config, device, seed, spec, pairs
        self.lr, self.batch_size = rm.lr, rm.batch_size
        self.micro_batch_size = rm.batch_size // config.learner.num_ranks  # one micro batch per rank and step

    def build(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return build_reward_model(self.spec)

    def micro_loss(self, engine: Any, chunk: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
        rm, model = self.config.reward_model, engine.module
        chosen, rejected, tie = pair_sides([self.pairs[i] for i in chunk])
        chosen, rejected = model.prepare(chosen), model.prepare(rejected)
        if rm.augment:
            model.augment_pairs(chosen, rejected, generator)
        dtype = next(model.parameters()).dtype
        r_chosen = engine(**on_device(chosen, self.device, dtype))  # (B,)
        r_rejected = engine(**on_device(rejected, self.device, dtype))  # (B,)
        return bradley_terry_loss(r_chosen, r_rejected, tie.to(self.device), rm.margin, rm.ties, rm.tie_theta)

    def pair_scores(self, model: nn.Module, pairs: list[PreferencePair],
                    batch_size: int = 64) -> tuple[list[float], list[float]]:
        """Rewards of chosen and rejected for held-out pairs (eval mode, no gradient)."""
        assert isinstance(model, (ConvRewardModel, VlmRewardModel))  # the engine's module, which build() made
        model.eval()
        dtype = next(model.parameters()).dtype
        chosen: list[float] = []
        rejected: list[float] = []
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                sides = pair_sides(pairs[start : start + batch_size])
                chosen += model(**on_device(model.prepare(sides[0]), self.device, dtype)).float().cpu().tolist()
                rejected += model(**on_device(model.prepare(sides[1]), self.device, dtype)).float().cpu().tolist()
        return chosen, rejected

    def export(self, module: nn.Module, directory: str) -> None:
        save_reward_model(module, directory)
