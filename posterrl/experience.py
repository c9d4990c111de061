"""One rl prompt group from sampling to training: the Experience record, and the samples the learner takes.

No Ray and no role imports here: the driver builds Experiences from what the rollout actors and the
reward server return, `learner.scoring` fills in advantages and r, and the rollout log reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from posterrl.data.manifest import ManifestRow
from posterrl.images import uncanvas, uncanvas_detailed


class SampledGroup(Protocol):
    """What a rollout actor returns for one prompt (rollout.worker.RolloutGroup), as the record reads it."""

    inputs: torch.Tensor  # (N, 3, R, R)
    samples: torch.Tensor  # (K, 3, R, R)
    latents: torch.Tensor | None  # (K, *latent_shape), None for a pixel-space policy
    output_aspect: tuple[float, float]
    policy_version: int
    frame_input: Image.Image | None  # the first input the outputs add the detail of (model.input_detail), or None


def output_images(group: SampledGroup, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """A group's K samples as images at its output aspect, optionally resized to size (w, h)."""
    if group.frame_input is not None:
        return [uncanvas_detailed(s, group.inputs[0], group.frame_input, size) for s in group.samples]
    return [uncanvas(s, group.output_aspect, size) for s in group.samples]


class ScoredSample(Protocol):
    """The reward server's answer for one sample (reward_server.registry.RewardResult), as the record reads it."""

    reward: float | None
    components: dict[str, float]
    weights: dict[str, float]
    versions: dict[str, int]
    failed: dict[str, str]


@dataclass
class RlSample:
    """One scored rollout sample as the learner trains on it (the NFT stage).

    inputs: (N, 3, R, R) the input canvases the policy was conditioned on, in [-1, 1]
    x0:     (*S) the clean sample the sampling policy produced: the canvas (3, R, R) in [-1, 1] for a pixel-space
            policy, the sampler's latents for a released pipeline
    r:      optimality probability in [0, 1] (docs/design.md: from the group-normalised reward)
    """

    prompt_id: str
    task: str
    instruction: str
    inputs: torch.Tensor
    x0: torch.Tensor
    r: float


def stack_rl_samples(samples: Sequence[RlSample]) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """instructions, inputs (B, N, 3, R, R), x0 (B, *S), r (B,); every sample must have the same N."""
    counts = {s.inputs.shape[0] for s in samples}
    if len(counts) != 1:
        raise ValueError(f"stack_rl_samples needs samples with one number of inputs, got {sorted(counts)}")
    return ([s.instruction for s in samples], torch.stack([s.inputs for s in samples]),
            torch.stack([s.x0 for s in samples]), torch.tensor([s.r for s in samples], dtype=torch.float32))


@dataclass
class Experience:
    """The K samples of one prompt of an rl epoch, their rewards and, once scored, what training makes of them.

    row:             the manifest row that was the prompt (its id, task and instruction are the group's)
    inputs:          (N, 3, R, R) the input canvases the samples were conditioned on, in [-1, 1]
    samples:         (K, 3, R, R) the clean outputs of the sampling policy, in [-1, 1]
    latents:         (K, *latent_shape) what the sampler produced (the NFT update's x0); None for a pixel-space
                     policy, whose samples are its x0
    output_aspect:   (w, h) the outputs are cropped to
    policy_version:  version of the weights that sampled them
    reward:          (K,) combined reward; NaN where a live scorer gave no finite score (the sample is dropped)
    components:      {scorer: (K,)} every asked scorer's score, shadow ones included; NaN where it failed
    weights:         {scorer: weight} and reward_versions {scorer: version} of the registry snapshot that
                     scored the group (the reward server never splits a request, so one snapshot per group)
    failed:          K dicts {scorer: reason} of the scores that were dropped
    advantages, r:   (K,) group-normalised advantage and optimality probability; NaN where not scored
                     (dropped samples, groups with fewer than two scored samples), filled by learner.scoring
    filtered:        the group's rewards spread too little to train on (scored and logged all the same)
    frame_input:     the first input at its own resolution when the outputs add its detail (model.input_detail)
    """

    row: ManifestRow
    inputs: torch.Tensor
    samples: torch.Tensor
    output_aspect: tuple[float, float]
    policy_version: int
    reward: np.ndarray
    components: dict[str, np.ndarray]
    weights: dict[str, float]
    reward_versions: dict[str, int]
    failed: list[dict[str, str]]
    advantages: np.ndarray
    r: np.ndarray
    filtered: bool = False
    latents: torch.Tensor | None = None
    frame_input: Image.Image | None = None

    @classmethod
    def from_rollout(cls, row: ManifestRow, group: SampledGroup, results: Sequence[ScoredSample]) -> Experience:
        """A group as a rollout actor sampled it, with the reward server's answer for each of its K samples."""
        first = results[0]
        k = len(results)
        reward = np.array([np.nan if res.reward is None else res.reward for res in results])  # (K,)
        components = {name: np.array([res.components.get(name, np.nan) for res in results])  # (K,)
                      for name in first.weights}
        return cls(row=row, inputs=group.inputs, samples=group.samples, output_aspect=group.output_aspect,
                   policy_version=group.policy_version, reward=reward, components=components,
                   weights=dict(first.weights), reward_versions=dict(first.versions),
                   failed=[dict(res.failed) for res in results], advantages=np.full(k, np.nan), r=np.full(k, np.nan),
                   latents=group.latents, frame_input=group.frame_input)

    @property
    def prompt_id(self) -> str:
        return self.row.id

    @property
    def task(self) -> str:
        return self.row.task

    @property
    def instruction(self) -> str:
        return self.row.instruction

    @property
    def size(self) -> int:
        """K, the number of samples."""
        return self.samples.shape[0]

    def sample_components(self, k: int) -> dict[str, float]:
        """Sample k's finite scores by scorer, in the registry's order (what the reward server reported)."""
        return {name: float(values[k]) for name, values in self.components.items() if np.isfinite(values[k])}

    def output_images(self, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """The K samples as images at the output aspect, optionally resized to size (w, h)."""
        return output_images(self, size)

    def training_samples(self) -> list[RlSample]:
        """The samples the learner trains on: those with an optimality probability, unless the group is filtered."""
        if self.filtered:
            return []
        x0 = self.samples if self.latents is None else self.latents  # (K, *S)
        return [RlSample(self.prompt_id, self.task, self.instruction, self.inputs, x0[k], float(self.r[k]))
                for k in np.flatnonzero(np.isfinite(self.r)).tolist()]
