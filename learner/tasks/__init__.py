"""The training tasks, one per stage: the one place that says which exist.

A new algorithm (Flow-GRPO, Diffusion-DPO) is a new task class here plus a pure loss function.
"""

from __future__ import annotations

from learner.tasks.base import TaskState, TrainingTask
from learner.tasks.nft import NftTask
from learner.tasks.policy import DistillTask, SftTask
from learner.tasks.reward_model import RewardModelTask

TASKS: dict[str, type] = {
    "sft": SftTask,  # flow matching: the experts
    "distill": DistillTask,  # flow matching + expert velocities: the student
    "nft": NftTask,  # DiffusionNFT on scored rollouts: the rl stage
    "reward_model": RewardModelTask,  # Bradley-Terry on preference pairs: the reward stage
}

__all__ = ["TASKS", "DistillTask", "NftTask", "RewardModelTask", "SftTask", "TaskState", "TrainingTask"]
