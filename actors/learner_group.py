"""N learner ranks as Ray actors in one placement group, each wrapping `learner.engine.Learner`."""

from __future__ import annotations

from collections.abc import Sequence

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.cluster import threads_for
from learner.engine import Learner, StepStats
from posterrl.batch import RlSample
from posterrl.config import Config
from posterrl.data.manifest import ManifestRow


class LearnerGroup:
    def __init__(self, config: Config):
        lc = config.learner
        self.gpus_per_rank = lc.gpus_per_rank
        bundle = {"CPU": lc.cpus_per_rank, **({"GPU": lc.gpus_per_rank} if lc.gpus_per_rank else {})}
        self.placement = placement_group([bundle] * lc.num_ranks, strategy="PACK")
        ray.get(self.placement.ready())
        remote_learner = ray.remote(num_cpus=lc.cpus_per_rank, num_gpus=lc.gpus_per_rank)(Learner)
        self.ranks = [
            remote_learner.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)
            ).remote(config.model_dump(mode="json"), rank, lc.num_ranks, threads_for(lc.cpus_per_rank))
            for rank in range(lc.num_ranks)
        ]
        # Rank 0 picks the rendezvous address on its own node; every rank then joins at once.
        master_addr, master_port = ray.get(self.ranks[0].free_address.remote())
        ray.get([r.join.remote(master_addr, master_port) for r in self.ranks])

    def call(self, method: str, *args, **kwargs) -> list:
        """The same method on every rank, concurrently (collectives need all ranks)."""
        return ray.get([getattr(r, method).remote(*args, **kwargs) for r in self.ranks])

    def start_stage(self, stage: str, policy_state: dict[str, torch.Tensor] | None, seed: int) -> int:
        state_ref = ray.put(policy_state) if policy_state is not None else None
        return self.call("start_stage", stage, state_ref, seed)[0]

    def set_experts(self, expert_states: dict[str, dict[str, torch.Tensor]]) -> None:
        self.call("set_experts", ray.put(expert_states))

    def train_step(self, rows: Sequence[ManifestRow], objective: str) -> StepStats:
        rows_ref = ray.put(list(rows))
        return self.call("train_step", rows_ref, objective)[0]  # already averaged over ranks

    def train_rl_step(self, samples: Sequence[RlSample]) -> StepStats:
        samples_ref = ray.put(list(samples))
        return self.call("train_rl_step", samples_ref)[0]  # already averaged over ranks

    def state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get(self.ranks[0].state_dict.remote())

    def shutdown(self) -> None:
        try:
            self.call("shutdown")
        finally:
            for rank in self.ranks:
                ray.kill(rank)
            remove_placement_group(self.placement)
            self.ranks = []
