"""Which class is the policy of each model kind: the one place a stage's `model.kind` becomes a model.

Every stage builds, loads and restores policies through these functions, so a new kind is a new entry of
POLICY_CLASSES (a class with the `posterrl.policy.Policy` interface and from_config / from_pretrained).
"""

from __future__ import annotations

from pathlib import Path

import torch

from posterrl.config import ModelConfig, RolloutConfig
from posterrl.models.kontext_policy import KontextPolicy
from posterrl.models.pipeline_policy import PipelinePolicy
from posterrl.models.qwen_policy import QwenEditPolicy
from posterrl.policy import EditPolicy, Policy, PolicySpec

POLICY_CLASSES: dict[str, type[EditPolicy] | type[PipelinePolicy]] = {
    "tiny_flux": EditPolicy,
    "flux_kontext": KontextPolicy,
    "qwen_image_edit": QwenEditPolicy,
}


# rollout.dtype -> the dtype the actors' policies sample in
SAMPLING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def policy_class(kind: str) -> type[EditPolicy] | type[PipelinePolicy]:
    if kind not in POLICY_CLASSES:
        raise NotImplementedError(f"model.kind={kind!r}: this version of posterrl builds {sorted(POLICY_CLASSES)}")
    return POLICY_CLASSES[kind]


def build_policy(model: ModelConfig, rollout: RolloutConfig | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Policy:
    """The policy a config describes (a released kind: its checkpoint with fresh adapters), `state` loaded if given."""
    policy = policy_class(model.kind).from_config(model, rollout)
    if state is not None:
        policy.load_policy_state(state)
    return policy


def load_policy(directory: str | Path) -> Policy:
    """An exported policy (a folder under <run_dir>/checkpoints/<stage>/), whatever its kind."""
    return policy_class(PolicySpec.load(directory).kind).from_pretrained(directory).eval()
