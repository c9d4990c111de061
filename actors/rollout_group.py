"""M rollout actors, each a `RolloutWorker` wrapped with `ray.remote` at spawn time."""

from __future__ import annotations

from collections.abc import Sequence

import ray
import torch

from actors.cluster import threads_for
from posterrl.config import Config
from posterrl.data.manifest import ManifestRow
from rollout.sampler import SamplerConfig
from rollout.worker import RolloutGroup, RolloutWorker


class RolloutActorGroup:
    def __init__(self, config: Config):
        rc = config.rollout
        remote_worker = ray.remote(num_cpus=rc.cpus_per_actor, num_gpus=rc.gpus_per_actor)(RolloutWorker)
        self.actors = [
            remote_worker.remote(model=config.model.model_dump(mode="json"),
                                 num_threads=threads_for(rc.cpus_per_actor))
            for _ in range(rc.num_actors)
        ]
        self.sampler = SamplerConfig(rc.solver, rc.num_steps, rc.shift)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """One `ray.put`; every actor reads the same object."""
        state_ref = ray.put(state_dict)
        ray.get([a.load_weights.remote(state_ref, version) for a in self.actors])

    def submit(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int,
               chunk: int = 4) -> list[ray.ObjectRef]:
        """Chunks of rows dealt round-robin to the actors; ref i resolves to chunk i's groups, in order."""
        chunks = [list(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]
        return [self.actors[i % len(self.actors)].sample.remote(c, group_size, base_seed, self.sampler)
                for i, c in enumerate(chunks)]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def gather(refs: list[ray.ObjectRef]) -> list[RolloutGroup]:
    return [group for share in ray.get(refs) for group in share]
