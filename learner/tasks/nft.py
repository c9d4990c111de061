"""The rl stage's training task: DiffusionNFT on scored rollout samples (learner/nft.py has the math).

theta trains in the DeepSpeed engine; beside it live two frozen copies of the starting weights: the
sampling policy theta_old (what rollouts use; soft-updated after each epoch, checkpointed as task
state) and the reference the KL term anchors to (left out when rl.kl_coef is 0). Every rank holds the
same theta_old: ZeRO-2 keeps whole parameters on each rank and the soft update is deterministic, so no
rank has to broadcast it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.distributed import train_dtype
from learner.flow import draw_grid_flow_inputs
from learner.nft import NftHyper, nft_loss, sampling_policy_eta, soft_update
from learner.tasks.base import Stats, TaskState, build_policy, export_policy, frozen_policy
from posterrl.config import Config
from posterrl.experience import RlSample, stack_rl_samples
from posterrl.flow import flow_sigmas
from posterrl.weight_sync import BroadcastGroup, trainable_tensors


class NftTask:
    def __init__(self, config: Config, device: torch.device, seed: int, init_state: dict[str, torch.Tensor]):
        rl, rollout = config.rl, config.rollout
        self.config, self.device, self.init_state = config, device, init_state
        self.lr, self.batch_size, self.micro_batch_size = rl.lr, rl.batch_size, config.learner.micro_batch_size
        self.hyper = NftHyper(beta=rl.beta, adv_max=rl.adv_max, kl_coef=rl.kl_coef)
        dtype = train_dtype(config)
        self.sampling_policy = frozen_policy(config, init_state, device, dtype)  # theta_old
        self.reference = frozen_policy(config, init_state, device, dtype) if rl.kl_coef > 0 else None
        self.time_grid = flow_sigmas(rollout.num_steps, rollout.shift)[:-1]  # (S,) the rollout's steps; 0 is no step
        self.sampling_updates = 0  # soft updates of theta_old so far (eta's schedule counts them)
        self.weight_group: BroadcastGroup | None = None  # rank 0 with rollout.weight_sync=broadcast

    def build(self) -> nn.Module:
        return build_policy(self.config, self.init_state)

    def micro_loss(self, engine: Any, chunk: Sequence[RlSample],
                   generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
        policy = engine.module
        dtype = next(policy.parameters()).dtype
        instructions, inputs, x0, r = stack_rl_samples(chunk)  # (B, N, 3, R, R), (B, 3, R, R), (B,)
        x0, inputs, r = x0.to(self.device, dtype), inputs.to(self.device, dtype), r.to(self.device)
        x_t, t, _ = draw_grid_flow_inputs(x0, self.time_grid, generator)  # (B, 3, R, R), (B,)
        ids, mask = policy.tokenize(instructions)
        v = engine(x_t, t, ids, mask, inputs)  # (B, 3, R, R)
        with torch.no_grad():
            v_old = self.sampling_policy(x_t, t, ids, mask, inputs)  # (B, 3, R, R)
            v_ref = self.reference(x_t, t, ids, mask, inputs) if self.reference is not None else None
        return nft_loss(v, v_old, v_ref, x0, x_t, t, r, self.hyper)

    def update_sampling_policy(self, theta: nn.Module) -> float:
        """theta_old <- eta theta_old + (1 - eta) theta after an epoch; returns the eta used."""
        rl = self.config.rl
        eta = sampling_policy_eta(self.sampling_updates, rl.eta_rate, rl.eta_max)
        soft_update(self.sampling_policy.parameters(), theta.parameters(), eta)
        self.sampling_updates += 1
        return eta

    def sampling_weights(self) -> dict[str, np.ndarray]:
        """theta_old as fp32 numpy arrays: the object store reads numpy without copies on every actor."""
        return {k: v.detach().float().cpu().numpy() for k, v in self.sampling_policy.state_dict().items()}

    def join_weight_broadcast(self, master_addr: str, master_port: int, world_size: int,
                              store: Any = None) -> None:
        """Rank 0 only: host the broadcast group to the rollout workers (NCCL on GPU, gloo on CPU) on `store`
        (opened by Learner.open_weight_broadcast), or on master_addr:master_port."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.weight_group = BroadcastGroup(master_addr, master_port, 0, world_size, backend, store=store)

    def broadcast_sampling_weights(self) -> int:
        """Send theta_old to every rollout worker of the broadcast group; returns the bytes sent."""
        if self.weight_group is None:
            raise RuntimeError("broadcast_sampling_weights before join_weight_broadcast")
        return self.weight_group.broadcast(trainable_tensors(self.sampling_policy))

    def state(self) -> TaskState:
        # clone: the text encoder ties two state-dict keys to one tensor, which safetensors refuses to save
        tensors = {k: v.detach().clone().contiguous() for k, v in self.sampling_policy.state_dict().items()}
        return TaskState({"sampling_updates": self.sampling_updates}, tensors)

    def load_state(self, state: TaskState) -> None:
        self.sampling_policy.load_state_dict(state.tensors)
        self.sampling_updates = state.info["sampling_updates"]

    def export(self, module: nn.Module, directory: str) -> None:
        """theta_old: the policy the rollouts came from (and what evaluation samples)."""
        export_policy(self.sampling_policy, directory)
