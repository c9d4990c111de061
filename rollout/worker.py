"""The rollout role: holds a copy of the sampling policy and turns prompts into K samples each.

A plain class; actors/ wraps it with `ray.remote` at spawn time, tests and `posterrl sample` use
it in-process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from posterrl.batch import bucket_by_num_inputs, collate
from posterrl.config import ModelConfig
from posterrl.data.manifest import ManifestRow
from posterrl.images import uncanvas
from posterrl.policy import EditPolicy, quiet_model_libraries
from rollout.sampler import SamplerConfig, prompt_seed, sample_groups


@dataclass
class RolloutGroup:
    """The K samples of one prompt.

    samples:        (K, 3, R, R) canvases in [-1, 1] (the clean x0 the learner trains on)
    output_aspect:  (w, h) the outputs are cropped to
    policy_version: version of the weights that sampled them
    """

    prompt_id: str
    task: str
    instruction: str
    samples: torch.Tensor
    output_aspect: tuple[float, float]
    seed: int
    policy_version: int

    def output_images(self, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """The K samples as images at the output aspect, optionally resized to size (w, h)."""
        return [uncanvas(s, self.output_aspect, size) for s in self.samples]


class RolloutWorker:
    def __init__(self, model: dict | None = None, checkpoint: str | None = None, num_threads: int | None = None):
        """Build the policy from a model config (weights arrive with `load_weights`) or load an exported one."""
        quiet_model_libraries()
        if (model is None) == (checkpoint is None):
            raise ValueError("RolloutWorker needs exactly one of model (a config dict) or checkpoint (a directory)")
        if num_threads:
            torch.set_num_threads(num_threads)
        if checkpoint is not None:
            self.policy = EditPolicy.from_pretrained(checkpoint)
        else:
            self.policy = EditPolicy.from_config(ModelConfig.model_validate(model))
        self.policy.eval().requires_grad_(False)
        self.policy_version = 0

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        self.policy.load_state_dict(state_dict)
        self.policy_version = version
        return version

    def sample(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int, sampler: SamplerConfig,
               max_batch: int = 16) -> list[RolloutGroup]:
        """K = group_size samples for each row, in the order of `rows`.

        Noise depends only on (base_seed, row id), so the same prompt gives the same samples in
        any batch, on any actor.
        """
        groups: dict[str, RolloutGroup] = {}
        per_call = max(1, max_batch // group_size)
        for bucket in bucket_by_num_inputs(rows, per_call):
            batch = collate(bucket, self.policy.spec.resolution, with_targets=False)
            seeds = [prompt_seed(base_seed, i) for i in batch.ids]
            out = sample_groups(self.policy, batch.instructions, batch.inputs, seeds, group_size, sampler)
            for g, row_id in enumerate(batch.ids):
                groups[row_id] = RolloutGroup(
                    prompt_id=row_id,
                    task=batch.tasks[g],
                    instruction=batch.instructions[g],
                    samples=out.images[g],
                    output_aspect=batch.output_aspects[g],
                    seed=seeds[g],
                    policy_version=self.policy_version,
                )
        return [groups[r.id] for r in rows]
