"""The rl stage's training task: DiffusionNFT on scored rollout samples (learner/nft.py has the math).

theta trains in the DeepSpeed engine; beside it live two frozen copies of the starting policy state (every
weight of a policy trained in full, the adapters only with LoRA): the sampling policy theta_old (what rollouts
use; soft-updated after each epoch, checkpointed as task state) and the reference the KL term anchors to (left
out when rl.kl_coef is 0). Both run through theta's own layers with their tensors swapped in
(`velocity_with`), so a LoRA policy's frozen base exists once, as DiffusionNFT keeps theta_old as a second
adapter. Every rank holds the same theta_old: the soft update reads theta whole (gathered under ZeRO-3) and
is deterministic, so no rank has to broadcast it.
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
from learner.tasks.base import Stats, TaskState, build_policy, export_policy, frozen_state, velocity_with
from posterrl.config import Config
from posterrl.experience import RlSample, stack_rl_samples
from posterrl.flow import SamplerConfig
from posterrl.policy import check_state_keys
from posterrl.weight_sync import BroadcastGroup, probe_inputs


def reference_state(config: Config, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The KL term's anchor (rl.kl_reference): the state rl started from, or the released model with no
    fine-tuning: with LoRA the start's adapters with B = 0 (a LoRA update is B A, so the adapters are off), in full
    fine-tuning the checkpoint's own transformer, built again."""
    if config.rl.kl_reference == "start":
        return start
    if config.model.lora.rank > 0:
        return {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in start.items()}
    return build_policy(config, None).policy_state()  # type: ignore[operator]


class NftTask:
    def __init__(self, config: Config, device: torch.device, seed: int, init_state: dict[str, torch.Tensor]):
        rl = config.rl
        self.config, self.device, self.init_state = config, device, init_state
        self.lr, self.batch_size, self.micro_batch_size = rl.lr, rl.batch_size, config.learner.micro_batch_size
        self.hyper = NftHyper(beta=rl.beta, adv_max=rl.adv_max, kl_coef=rl.kl_coef)
        dtype = train_dtype(config)
        self.sampling_state = frozen_state(init_state, device, dtype)  # theta_old
        self.reference = frozen_state(reference_state(config, init_state), device, dtype) if rl.kl_coef > 0 else None
        self.time_grid: torch.Tensor | None = None  # (S,) the rollout's steps (0 is no step), set by build
        self.sampling_updates = 0  # soft updates of theta_old so far (eta's schedule counts them)
        self.checksum_keys: list[str] = []
        self.weight_group: BroadcastGroup | None = None  # rank 0 with rollout.weight_sync=broadcast
        self.partitioned = config.deepspeed.zero_stage == 3  # ZeRO-3: theta's tensors are sharded over ranks

    def build(self) -> nn.Module:
        policy = build_policy(self.config, self.init_state)
        self.time_grid = policy.time_grid(SamplerConfig.from_rollout(self.config.rollout))[:-1]  # type: ignore[operator]
        # the keys of distinct tensors (tied ones counted once, as module.parameters() counts them)
        seen: set[int] = set()
        self.checksum_keys = []
        for key, tensor in policy.policy_state().items():  # type: ignore[operator]
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                self.checksum_keys.append(key)
        return policy

    def sampling_probe(self, module: nn.Module) -> torch.Tensor:
        """theta_old's velocity on the fixed probe input (posterrl.weight_sync.probe_inputs), through `module`'s
        layers with theta_old's tensors swapped in: what every rollout actor's policy must give after a sync."""
        x_t, t, instructions, inputs = probe_inputs(module)
        prepared = module.prepare(instructions, inputs)  # type: ignore[operator]
        return velocity_with(module, self.sampling_state, x_t, t, *prepared, partitioned=self.partitioned).float().cpu()

    def sampling_checksum(self) -> float:
        """Sum of theta_old's tensors, each tied tensor once (tests follow the soft update with it)."""
        return float(sum(self.sampling_state[k].double().sum() for k in self.checksum_keys))

    def micro_loss(self, engine: Any, chunk: Sequence[RlSample],
                   generator: torch.Generator) -> tuple[torch.Tensor, Stats]:
        policy = engine.module
        assert self.time_grid is not None, "micro_loss before build"
        dtype = next(policy.parameters()).dtype
        instructions, inputs, x0, r = stack_rl_samples(chunk)  # (B, N, 3, R, R), (B, *S), (B,)
        x0, inputs, r = x0.to(self.device, dtype), inputs.to(self.device, dtype), r.to(self.device)
        x_t, t, _ = draw_grid_flow_inputs(x0, self.time_grid, generator)  # (B, *S), (B,)
        prepared = policy.prepare(instructions, inputs)
        # the frozen states' forwards before theta's: they overwrite theta's tensors for a moment (velocity_with)
        v_old = velocity_with(policy, self.sampling_state, x_t, t, *prepared, partitioned=self.partitioned)
        v_ref = (velocity_with(policy, self.reference, x_t, t, *prepared, partitioned=self.partitioned)
                 if self.reference is not None else None)  # (B, *S) each
        v = engine(x_t, t, *prepared)  # (B, *S)
        return nft_loss(v, v_old, v_ref, x0, x_t, t, r, self.hyper)

    def update_sampling_policy(self, theta: nn.Module) -> float:
        """theta_old <- eta theta_old + (1 - eta) theta after an epoch; returns the eta used."""
        rl = self.config.rl
        eta = sampling_policy_eta(self.sampling_updates, rl.eta_rate, rl.eta_max)
        theta_state = theta.policy_state()  # type: ignore[operator]
        soft_update(self.sampling_state.values(), (theta_state[k] for k in self.sampling_state), eta)
        self.sampling_updates += 1
        return eta

    def sampling_weights(self) -> dict[str, np.ndarray]:
        """theta_old as fp32 numpy arrays: the object store reads numpy without copies on every actor."""
        return {k: v.detach().float().cpu().numpy() for k, v in self.sampling_state.items()}

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
        return self.weight_group.broadcast(list(self.sampling_state.values()))

    def state(self) -> TaskState:
        # clone: the tiny text encoder ties two state-dict keys to one tensor, which safetensors refuses to save
        tensors = {k: v.detach().clone().contiguous() for k, v in self.sampling_state.items()}
        return TaskState({"sampling_updates": self.sampling_updates}, tensors)

    def load_state(self, state: TaskState) -> None:
        check_state_keys(state.tensors, list(self.sampling_state), "checkpointed theta_old")
        for k, v in state.tensors.items():
            self.sampling_state[k].copy_(v)
        self.sampling_updates = state.info["sampling_updates"]

    def export(self, module: nn.Module, directory: str) -> None:
        """theta_old: the policy the rollouts came from (and what evaluation samples), written through theta's
        module with theta_old's tensors in place (theta's own are put back after)."""
        theta = module.policy_state()  # type: ignore[operator]
        current = {k: v.detach().clone() for k, v in theta.items()}
        module.load_policy_state(self.sampling_state)  # type: ignore[operator]
        try:
            export_policy(module, directory)
        finally:
            module.load_policy_state(current)  # type: ignore[operator]
