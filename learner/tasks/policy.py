"""Supervised training of the edit policy: `sft` (flow matching, one expert per regime) and `distill`
(one student from both experts, PosterOmni)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from learner.distributed import train_dtype
from learner.flow import draw_flow_inputs
from learner.latent_cache import TargetLatents
from learner.losses import distillation_loss, flow_matching_loss, pick_expert_velocity
from learner.tasks.base import StatelessTask, Stats, build_policy, export_policy, frozen_state, velocity_with
from posterrl.batch import collate
from posterrl.config import Config
from posterrl.data.manifest import ManifestRow
from posterrl.data.tasks import REGIME
from posterrl.policy import Policy


@dataclass
class FlowInputs:
    """One micro batch of B rows, noised: what the policy's velocity is computed from (latents of shape (B, *S):
    S = (3, R, R) for a pixel-space policy, the VAE's packed latents for a released one)."""

    x0: torch.Tensor  # (B, *S) targets
    eps: torch.Tensor  # (B, *S) noise
    x_t: torch.Tensor  # (B, *S)
    t: torch.Tensor  # (B,)
    prepared: tuple[torch.Tensor, ...]  # the conditioning arguments of the forward (policy.prepare)
    tasks: list[str]
    weight: torch.Tensor  # (B,) each row's loss weight (policy.loss_weight)


def flow_inputs(policy: Policy, rows: Sequence[ManifestRow], resolution: int, device: torch.device,
                generator: torch.Generator, latents: TargetLatents | None = None) -> FlowInputs:
    """Collate rows, encode the targets (through the on-disk cache `latents` when given), draw (t, eps)."""
    batch = collate(rows, resolution, stretch_rescaled=policy.spec.stretch_rescaled_input)
    assert batch.targets is not None, "training rows need targets"
    dtype = next(policy.parameters()).dtype  # bf16 when DeepSpeed runs in bf16
    targets = batch.targets.to(device, dtype)  # (B, 3, R, R)
    inputs = batch.inputs.to(device, dtype)  # (B, N, 3, R, R)
    x0 = (latents(policy, rows, targets, inputs) if latents is not None
          else policy.encode_images(targets, inputs))  # (B, *S)
    x_t, t, eps = draw_flow_inputs(x0, generator)  # (B, *S), (B,), (B, *S)
    prepared = policy.prepare(batch.instructions, inputs)
    return FlowInputs(x0, eps, x_t, t, prepared, batch.tasks, policy.loss_weight(t, inputs))


class SftTask(StatelessTask):
    """Flow matching on manifest rows (inputs, instruction, target): one expert per regime."""

    def __init__(self, config: Config, device: torch.device, seed: int,
                 init_state: dict[str, torch.Tensor] | None = None, latent_cache: str | None = None):
        """latent_cache: where a latent-space policy's target latents are kept (learner/latent_cache.py)."""
        self.config, self.device, self.init_state = config, device, init_state
        self.latents = TargetLatents(latent_cache) if latent_cache else None
        self.lr, self.batch_size = config.sft.lr, config.sft.batch_size
        self.micro_batch_size = config.learner.micro_batch_size

    def build(self) -> nn.Module:
        return build_policy(self.config, self.init_state)

    def micro_loss(self, engine: Any, chunk: Sequence[ManifestRow],
                   generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
        f = flow_inputs(engine.module, chunk, self.config.model.resolution, self.device, generator, self.latents)
        v = engine(f.x_t, f.t, *f.prepared)  # (B, *S)
        return flow_matching_loss(v, f.x0, f.eps, f.weight)

    def export(self, module: nn.Module, directory: str) -> None:
        export_policy(module, directory)


class DistillTask(SftTask):
    """Task distillation (PosterOmni): flow matching plus lambda_E ||v_student - v_expert||^2.

    The frozen experts, one per regime, live on every rank beside the student as their policy states (teacher
    forwards through the student's own layers, `velocity_with`; no optimizer state), so each rank computes
    expert velocities for its own shard with no extra communication. With LoRA an expert is its adapters.
    """

    def __init__(self, config: Config, device: torch.device, seed: int,
                 expert_states: dict[str, dict[str, torch.Tensor]],
                 init_state: dict[str, torch.Tensor] | None = None, latent_cache: str | None = None):
        super().__init__(config, device, seed, init_state, latent_cache)
        self.lr, self.batch_size = config.distill.lr, config.distill.batch_size
        self.experts = {regime: frozen_state(state, device, train_dtype(config))
                        for regime, state in expert_states.items()}
        self.partitioned = config.deepspeed.zero_stage == 3  # ZeRO-3: the student's tensors are sharded over ranks

    def micro_loss(self, engine: Any, chunk: Sequence[ManifestRow],
                   generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
        f = flow_inputs(engine.module, chunk, self.config.model.resolution, self.device, generator, self.latents)
        is_global = torch.tensor([REGIME[task] == "global" for task in f.tasks], device=self.device)  # (B,)
        # the experts' forwards before the student's: they overwrite its tensors for a moment (velocity_with)
        v_local, v_global = (velocity_with(engine.module, self.experts[regime], f.x_t, f.t, *f.prepared,
                                           partitioned=self.partitioned)
                             for regime in ("local", "global"))  # (B, *S) each
        v_expert = pick_expert_velocity(v_local, v_global, is_global)  # (B, *S)
        v = engine(f.x_t, f.t, *f.prepared)  # (B, *S)
        return distillation_loss(v, v_expert, f.x0, f.eps, self.config.distill.lambda_expert, f.weight)
