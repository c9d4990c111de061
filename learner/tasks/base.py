"""What every training task gives the learner core, and the policy builder the policy tasks share.

A task is one stage's training: the module it trains, the loss of one micro batch, the state it keeps
beside the DeepSpeed engine (saved in checkpoints) and what it exports. The core
(learner/core.py) owns everything else: the process group, the engine, the step loop, checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from learner.distributed import deepspeed
from posterrl import policies
from posterrl.config import Config

Stats = dict[str, float]


@dataclass
class TaskState:
    """A task's own checkpoint state: JSON-able figures and named tensors (saved as safetensors by rank 0)."""

    info: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingTask(Protocol):
    """One stage's training, chosen by name from `learner.tasks.TASKS`."""

    lr: float
    batch_size: int  # samples (or pairs) per optimizer step, across ranks
    micro_batch_size: int  # per rank per forward; DeepSpeed accumulates over the rest

    def build(self) -> nn.Module:
        """The module DeepSpeed trains (its parameters with requires_grad are the optimizer's)."""
        ...

    def micro_loss(self, engine: Any, chunk: Sequence[Any], generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
        """(loss, stats) of one micro batch; `engine` is the DeepSpeed engine (forward through it, module
        at engine.module); `generator` fixes the noise of this (seed, step, rank, micro batch)."""
        ...

    def state(self) -> TaskState: ...

    def load_state(self, state: TaskState) -> None: ...

    def export(self, module: nn.Module, directory: str) -> None:
        """What the stage hands on (rank 0 only): a policy in diffusers layout, or a reward model."""
        ...


class StatelessTask:
    """For tasks whose whole state is the engine's: nothing of their own to checkpoint."""

    def state(self) -> TaskState:
        return TaskState()

    def load_state(self, state: TaskState) -> None:
        pass


def build_policy(config: Config, state: dict[str, torch.Tensor] | None) -> nn.Module:
    """The edit policy of config.model (posterrl.policies), with `state` (its policy_state()) loaded when given."""
    policy = policies.build_policy(config.model, config.rollout, state)
    assert isinstance(policy, nn.Module)
    return policy


def frozen_state(state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A copy of a policy_state() kept beside the trained module (in its device and dtype), without gradients:
    theta_old, the reference and the experts are such states, run through the trained module's own layers
    (`velocity_with`), so the frozen base of a LoRA policy exists once and a full copy of the model never."""
    return {k: v.detach().to(device, dtype).clone() for k, v in state.items()}


def velocity_with(policy: nn.Module, state: dict[str, torch.Tensor], *args: torch.Tensor,
                  partitioned: bool = False) -> torch.Tensor:
    """The policy's forward with the tensors of `state` in place of its own (the others as they are), no graph.

    `state`'s values are copied into the parameters for the call and the policy's own copied back after, rather
    than swapped by torch.func.functional_call: under ZeRO-3 (`partitioned`) each rank holds a shard of every
    parameter and DeepSpeed's hooks fetch them by their ZeRO attributes, so the copies go through gathered
    parameters (deepspeed.zero.GatheredParameters, rank 0's values written back to every shard). Call it before
    the trained forward of the same micro batch: its graph would otherwise hold tensors this overwrites.
    """
    parameters = list({id(p): p for p in (policy.get_parameter(k) for k in state)}.values())  # tied keys once
    keys = {id(policy.get_parameter(k)): k for k in state}
    with torch.no_grad():
        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0, enabled=partitioned):
            own = [p.data.clone() for p in parameters]
            for p in parameters:
                p.data.copy_(state[keys[id(p)]])
        try:
            return policy(*args)
        finally:
            with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0, enabled=partitioned):
                for p, data in zip(parameters, own, strict=True):
                    p.data.copy_(data)


def export_policy(policy: nn.Module, directory: str) -> None:
    policy.save_pretrained(Path(directory))  # type: ignore[operator]
