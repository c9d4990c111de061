"""N learner ranks as Ray actors in one placement group, each wrapping `learner.core.Learner`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.cluster import rendezvous_host, threads_for
from learner.core import Learner, StepStats
from posterrl.config import Config


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
        # Rank 0 opens the rendezvous store on loopback when every rank shares its node, else on the node IP
        # Ray reports; the store is bound before anyone is told its port. Every rank then joins at once.
        master_addr = rendezvous_host(self.ranks)
        master_port = ray.get(self.ranks[0].open_rendezvous.remote(master_addr))
        ray.get([r.join.remote(master_addr, master_port) for r in self.ranks])

    def call(self, method: str, *args, **kwargs) -> list:
        """The same method on every rank, concurrently (collectives need all ranks)."""
        return ray.get([getattr(r, method).remote(*args, **kwargs) for r in self.ranks])

    def start(self, task: str, seed: int, **inputs: Any) -> int:
        """Start `task` (learner.tasks.TASKS) on every rank; inputs (weights, experts, pairs) go through the
        object store once. Returns the number of trainable parameters."""
        refs = {name: ray.put(value) for name, value in inputs.items()}
        return self.call("start", task, seed, **refs)[0]

    def train_step(self, batch: Sequence) -> StepStats:
        """One optimizer step of the running task on a global batch, stats averaged over ranks."""
        return self.call("train_step", ray.put(list(batch)))[0]

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
