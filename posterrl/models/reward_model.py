"""Bradley-Terry reward models: a backbone plus a scalar head, built from a JSON spec, saved and loaded.

Shared by the learner (which trains them) and the reward server (which serves them as scorers).

Every reward model follows one contract, so the learner trains any of them the same way:
    model.spec                        the JSON spec it was built from (saved beside the weights)
    model.prepare(samples) -> dict    EditSamples -> tensors (CPU)
    model(**prepared) -> (B,)         one scalar reward per sample

Backbones: `conv` (ConvRewardModel, below: the tiny default) and `vlm` (posterrl/models/vlm_reward.py:
a Qwen2-VL / Qwen2.5-VL with an MLP head on the last token, optionally LoRA).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posterrl.config import RewardModelConfig
from posterrl.data.tasks import TASKS
from posterrl.files import replace_dir, staging_dir
from posterrl.images import canvas_tensor
from posterrl.models.samples import EditSample, PreferencePair

if TYPE_CHECKING:
    from posterrl.models.vlm_reward import VlmRewardModel

MODEL_SPEC_FILE = "posterrl_reward_model.json"
WEIGHTS_FILE = "model.safetensors"
MAX_INPUTS = 3


def reward_model_spec(bt: RewardModelConfig, seed: int = 0) -> dict:
    """The spec a reward model is built from, taken from the reward_model config section."""
    spec: dict[str, Any] = {"backbone": bt.backbone, "seed": seed, "tasks": list(TASKS)}
    if bt.backbone == "conv":
        spec.update(channels=bt.channels, image_size=bt.image_size, max_inputs=MAX_INPUTS,
                    difference_channels=bt.difference_channels)
    else:
        spec.update(vlm_path=bt.vlm_path, lora_rank=bt.lora_rank)
    return spec


def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(4, c_out), nn.GELU())


def _encoder(c_in: int, c: int) -> nn.Sequential:
    """S x S -> 2 x 2 x 4c features: three stride-2 stages, then a coarse spatial pool (layout matters)."""
    return nn.Sequential(_stage(c_in, c, 1), _stage(c, 2 * c, 2), _stage(2 * c, 4 * c, 2), _stage(4 * c, 4 * c, 2),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten())


class ConvRewardModel(nn.Module):
    """A small vision network that judges an edit given its inputs and task.

    The gold metric compares the output with a target the reward model never sees, so it must judge
    the edit from what the policy was given: one encoder looks at the output alone (is it a clean
    poster?), another at the output stacked channel-wise with each input (does it keep and use what
    it was given?), pooled over the 1..3 inputs; a learned task embedding says which edit was asked
    for. The instruction's text is not read: at the tiny default's 32 px canvas no title is legible,
    and the task fixes what kind of change is wanted.
    """

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        c, self.size = spec["channels"], spec["image_size"]
        self.tasks = list(spec["tasks"])
        features = 4 * c * 4
        # Saved specs from before the option have no key: plain channels.
        self.difference_channels = bool(spec.get("difference_channels", False))
        self.output_encoder = _encoder(6 if self.difference_channels else 3, c)
        self.pair_encoder = _encoder(12 if self.difference_channels else 6, c)
        self.task_embedding = nn.Embedding(len(self.tasks), 32)
        self.head = nn.Sequential(nn.Linear(2 * features + 32, 256), nn.GELU(), nn.Linear(256, 1))

    def prepare(self, samples: Sequence[EditSample]) -> dict[str, torch.Tensor]:
        n_inputs = self.spec["max_inputs"]
        inputs = torch.zeros(len(samples), n_inputs, 3, self.size, self.size)
        mask = torch.zeros(len(samples), n_inputs)
        for i, sample in enumerate(samples):
            for j, image in enumerate(sample.inputs[:n_inputs]):
                inputs[i, j], mask[i, j] = canvas_tensor(image, self.size), 1.0
        return {
            "output": torch.stack([canvas_tensor(s.output, self.size) for s in samples]),  # (B, 3, S, S)
            "inputs": inputs,  # (B, M, 3, S, S), zeros where absent
            "input_mask": mask,  # (B, M)
            "task": torch.tensor([self.tasks.index(s.task) for s in samples]),  # (B,)
        }

    @staticmethod
    def augment_pairs(chosen: dict[str, torch.Tensor], rejected: dict[str, torch.Tensor],
                      generator: torch.Generator) -> None:
        """The same random horizontal flip and RGB channel permutation for both sides of each pair, in place.

        Both leave the gold metric's ordering of a pair unchanged (its MSE and histogram terms are taken
        over all channels; the target flips and permutes with the outputs), and they multiply the
        distinct training views by 12: without them the small network memorises the pairs within a
        few hundred steps (docs/reward_model.md).
        """
        b = chosen["output"].shape[0]
        perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(b)])  # (B, 3)
        flip = torch.rand(b, generator=generator) < 0.5  # (B,)
        for side in (chosen, rejected):
            out, inp = side["output"], side["inputs"]  # (B, 3, S, S), (B, M, 3, S, S)
            out = torch.gather(out, 1, perm.view(b, 3, 1, 1).expand_as(out))
            inp = torch.gather(inp, 2, perm.view(b, 1, 3, 1, 1).expand_as(inp))
            side["output"] = torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)
            side["inputs"] = torch.where(flip.view(b, 1, 1, 1, 1), inp.flip(-1), inp)

    def forward(self, output: torch.Tensor, inputs: torch.Tensor, input_mask: torch.Tensor,
                task: torch.Tensor) -> torch.Tensor:
        b, m = input_mask.shape
        per_input = output.unsqueeze(1).expand(-1, m, -1, -1, -1)  # (B, M, 3, S, S)
        if self.difference_channels:
            # What the gold metric measures is a pixel distance, so the network gets differences given rather
            # than having to learn them from a few thousand pairs; the high-pass shows blockiness and noise.
            high_pass = output - nn.functional.avg_pool2d(output, 3, 1, 1, count_include_pad=False)  # (B, 3, S, S)
            f_out = self.output_encoder(torch.cat([output, high_pass], dim=1))  # (B, F)
            delta = per_input - inputs  # (B, M, 3, S, S)
            stacked = torch.cat([per_input, inputs, delta, delta.abs()], dim=2)  # (B, M, 12, S, S)
        else:
            f_out = self.output_encoder(output)  # (B, F)
            stacked = torch.cat([per_input, inputs], dim=2)  # (B, M, 6, S, S)
        # Only present inputs are encoded (1.4 of 3 slots on average over the six tasks): absent slots get zero
        # weight below anyway, and skipping them makes the forward 1.5-1.7x faster, batched or not.
        present = input_mask.flatten() > 0  # (B*M,)
        encoded = self.pair_encoder(stacked.flatten(0, 1)[present])  # (P, F), P present inputs in the batch
        f_pair = encoded.new_zeros(b * m, encoded.shape[1]).index_copy(
            0, present.nonzero().squeeze(1), encoded).view(b, m, -1)  # (B, M, F), zeros where absent
        weights = input_mask / input_mask.sum(1, keepdim=True).clamp(min=1)  # (B, M)
        f_inputs = (f_pair * weights.unsqueeze(-1)).sum(1)  # (B, F) mean over present inputs
        features = torch.cat([f_out, f_inputs, self.task_embedding(task)], dim=1)  # (B, 2F + 32)
        return self.head(features).squeeze(-1)  # (B,)


def build_reward_model(spec: dict) -> ConvRewardModel | VlmRewardModel:
    """The one place that maps a backbone name to its class."""
    torch.manual_seed(spec.get("seed", 0))
    if spec["backbone"] == "conv":
        return ConvRewardModel(spec)
    if spec["backbone"] == "vlm":
        from posterrl.models.vlm_reward import VlmRewardModel

        return VlmRewardModel(spec)
    raise ValueError(f"reward model spec: unknown backbone {spec['backbone']!r} (expected conv or vlm)")


def pair_sides(pairs: Sequence[PreferencePair]) -> tuple[list[EditSample], list[EditSample], torch.Tensor]:
    """Pairs as two aligned lists of samples (chosen, rejected) and the (B,) tie mask."""
    chosen = [EditSample(p.pair_id, p.task, p.instruction, p.inputs, p.chosen) for p in pairs]
    rejected = [EditSample(p.pair_id, p.task, p.instruction, p.inputs, p.rejected) for p in pairs]
    return chosen, rejected, torch.tensor([p.tie for p in pairs], dtype=torch.bool)


def save_reward_model(model: nn.Module, directory: str | Path) -> Path:
    """Weights and spec into `directory`, written beside it first and moved in whole."""
    tmp = staging_dir(directory)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    (tmp / MODEL_SPEC_FILE).write_text(json.dumps(model.spec, indent=2) + "\n")
    return replace_dir(tmp, directory)


def load_reward_model(directory: str | Path) -> ConvRewardModel | VlmRewardModel:
    """A saved reward model; errors name the directory and what is missing or wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"reward model {directory}: no such directory")
    spec_path, weights_path = directory / MODEL_SPEC_FILE, directory / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"reward model {directory}: missing {path.name} (not a saved posterrl reward model)")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"reward model {spec_path}: not valid JSON ({exc})") from exc
    model = build_reward_model(spec)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"reward model {weights_path}: unreadable weights ({type(exc).__name__}: {exc})") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"reward model {weights_path}: weights do not fit the spec in {MODEL_SPEC_FILE} "
                         f"({str(exc).splitlines()[0]})") from exc
    return model
