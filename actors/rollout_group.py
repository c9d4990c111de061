"""M rollout actors, each a `RolloutWorker` wrapped with `ray.remote` at spawn time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray
import torch
from PIL import Image

from actors.cluster import threads_for
from posterrl.config import Config
from posterrl.data.manifest import ManifestRow
from posterrl.flow import SamplerConfig
from posterrl.models.samples import EditSample
from rollout.worker import RolloutGroup, RolloutWorker


def output_size(row: ManifestRow, group: RolloutGroup) -> tuple[int, int]:
    """(w, h) of the edits as scorers and dumps see them: the target's size when the row has one (as the
    evaluation scores it), else the output aspect at the first input's long side. Sizes come from the
    files' headers, nothing is decoded."""
    if row.target is not None:
        with Image.open(row.target) as target:
            return target.size
    with Image.open(row.inputs[0]) as first_input:
        long_side = max(first_input.size)
    w, h = group.output_aspect
    return (long_side, max(1, round(long_side * h / w))) if w >= h else (max(1, round(long_side * w / h)), long_side)


def edit_samples(row: ManifestRow, group: RolloutGroup) -> list[EditSample]:
    """The K samples of a group as the scorers see them: images at the output size, with the row's inputs and meta."""
    inputs = row.load_inputs()
    return [EditSample(row.id, row.task, row.instruction, inputs, image, row.meta)
            for image in group.output_images(size=output_size(row, group))]


class RolloutActor(RolloutWorker):
    """A RolloutWorker that hands each finished chunk straight to the reward server, so scoring overlaps sampling."""

    def sample_and_score(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int, sampler: SamplerConfig,
                         reward_server, step: int) -> tuple[list[RolloutGroup], ray.ObjectRef]:
        """K samples per row, plus the reward server's answer for all of them (an ObjectRef, group-major order)."""
        groups = self.sample(rows, group_size, base_seed, sampler)
        edits = [edit for row, group in zip(rows, groups, strict=True) for edit in edit_samples(row, group)]
        return groups, reward_server.score.remote(edits, step)


class RolloutActorGroup:
    def __init__(self, config: Config):
        rc = config.rollout
        remote_worker = ray.remote(num_cpus=rc.cpus_per_actor, num_gpus=rc.gpus_per_actor)(RolloutActor)
        self.actors = [
            remote_worker.remote(model=config.model.model_dump(mode="json"),
                                 num_threads=threads_for(rc.cpus_per_actor))
            for _ in range(rc.num_actors)
        ]
        self.sampler = SamplerConfig.from_rollout(rc)

    def publish(self, weights: dict[str, torch.Tensor | np.ndarray] | ray.ObjectRef,
                version: int) -> list[ray.ObjectRef]:
        """Hand new weights to every actor: one object in the object store that every actor reads.

        Returns the actors' acknowledgements (seconds each spent loading). Each actor loads after the
        tasks already queued on it, so rollouts submitted before the publish keep their old version.
        """
        weights_ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        return [a.load_weights.remote(weights_ref, version) for a in self.actors]

    def load_weights(self, state_dict: dict[str, torch.Tensor] | ray.ObjectRef, version: int) -> None:
        ray.get(self.publish(state_dict, version))

    def _chunks(self, rows: Sequence[ManifestRow], chunk: int) -> list[list[ManifestRow]]:
        return [list(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]

    def submit(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int,
               chunk: int = 4) -> list[ray.ObjectRef]:
        """Chunks of rows dealt round-robin to the actors; ref i resolves to chunk i's groups, in order."""
        return [self.actors[i % len(self.actors)].sample.remote(c, group_size, base_seed, self.sampler)
                for i, c in enumerate(self._chunks(rows, chunk))]

    def submit_scored(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int, reward_server, step: int,
                      chunk: int = 4) -> list[ray.ObjectRef]:
        """As `submit`, but each chunk is sent to the reward server by its actor as soon as it is sampled;
        ref i resolves to (groups, rewards ref)."""
        return [self.actors[i % len(self.actors)].sample_and_score.remote(c, group_size, base_seed, self.sampler,
                                                                           reward_server, step)
                for i, c in enumerate(self._chunks(rows, chunk))]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def gather(refs: list[ray.ObjectRef]) -> list[RolloutGroup]:
    return [group for share in ray.get(refs) for group in share]
