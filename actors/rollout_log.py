"""What an rl epoch's rollouts leave behind: TensorBoard scalars, grids, text and histograms, and the on-disk dumps."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from actors.context import PipelineContext
from actors.rollout_group import output_size
from learner.scoring import EpochScores
from posterrl.experience import Experience
from posterrl.files import write_atomic
from posterrl.images import labelled_grid


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def oldest_policy_version(experiences: list[Experience]) -> int:
    """The version of the oldest weights that sampled the epoch (off_policy: up to rl.max_staleness behind)."""
    return min(e.policy_version for e in experiences)


class RolloutLog:
    """TensorBoard scalars, grids, text and histograms of an epoch's rollouts, and the on-disk dumps."""

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self.dump_root = ctx.run.root / "rollouts"

    def scalars(self, experiences: list[Experience], scored: EpochScores) -> dict[str, float]:
        components: dict[str, list[float]] = defaultdict(list)
        per_task: dict[str, list[float]] = defaultdict(list)
        versions: dict[str, int] = {}
        for experience in experiences:
            for name, version in experience.reward_versions.items():
                versions[name] = max(versions.get(name, 0), version)
            for k in range(experience.size):
                for name, value in experience.sample_components(k).items():
                    components[name].append(value)
                if not np.isnan(experience.reward[k]):
                    components["combined"].append(float(experience.reward[k]))
                    per_task[experience.task].append(float(experience.reward[k]))
        values: dict[str, float] = {}
        for name, scores in components.items():
            values[f"reward/{name}/mean"] = float(np.mean(scores))
            values[f"reward/{name}/std"] = float(np.std(scores))
        for name, version in versions.items():
            values[f"reward/{name}/version"] = float(version)
        for task, scores in per_task.items():
            values[f"reward/task/{task}/mean"] = float(np.mean(scores))
        values["rl/r_mean"] = scored.stats.get("r_mean", float("nan"))
        values["rl/advantage_abs_mean"] = scored.stats.get("advantage_abs_mean", float("nan"))
        values["rl/filtered_groups"] = float(len(scored.filtered_groups))
        values["rl/dropped_samples"] = float(scored.dropped_samples)
        values["rl/policy_version"] = float(oldest_policy_version(experiences))
        if self.ctx.writer is not None:
            for task, scores in per_task.items():
                self.ctx.writer.add_histogram(f"reward/task/{task}/hist", np.asarray(scores), self.ctx.global_step)
        return values

    def grids(self, epoch: int, experiences: list[Experience], per_task: int) -> None:
        """Per task, `per_task` prompt groups: the inputs, then the K outputs sorted by reward, each labelled."""
        writer = self.ctx.writer
        if writer is None or per_task == 0:
            return
        shown: dict[str, int] = defaultdict(int)
        for experience in experiences:
            if shown[experience.task] >= per_task:
                continue
            index = shown[experience.task]
            shown[experience.task] += 1
            outputs = experience.output_images()
            keys = [-np.inf if np.isnan(reward) else -reward for reward in experience.reward]  # dropped ones first
            order = sorted(range(experience.size), key=keys.__getitem__)
            inputs = experience.row.load_inputs()
            cells = [*inputs, *(outputs[k] for k in order)]
            labels = [*(f"input {i}" for i in range(len(inputs))), *(self._label(experience, k) for k in order)]
            sheet = labelled_grid([cells], [labels], cell=112)
            tag = f"rollout/{experience.task}/group{index}"
            writer.add_image(tag, np.asarray(sheet), self.ctx.global_step, dataformats="HWC")
            versions = ", ".join(f"{n} v{v}" for n, v in sorted(experience.reward_versions.items()))
            writer.add_text(tag, f"`{experience.prompt_id}` (epoch {epoch}, policy v{experience.policy_version}, "
                                 f"rewards: {versions})\n\n{experience.instruction}", self.ctx.global_step)

    @staticmethod
    def _label(experience: Experience, k: int) -> str:
        reward = experience.reward[k]
        head = "R dropped" if np.isnan(reward) else f"R {reward:.3f}"
        parts = "\n".join(f"{name} {value:.3f}" for name, value in sorted(experience.sample_components(k).items()))
        return f"{head}\n{parts}"

    def dump(self, epoch: int, experiences: list[Experience]) -> Path:
        """Every sample as a PNG and a JSONL row under <run>/rollouts/epoch_NNNN/."""
        folder = self.dump_root / f"epoch_{epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for experience in experiences:
            # exactly what was scored; output_size reads only the output aspect of what it is given
            size = output_size(experience.row, experience)  # type: ignore[arg-type]
            for k, image in enumerate(experience.output_images(size=size)):
                name = f"{safe_name(experience.prompt_id)}_{k}.png"
                image.save(folder / name)
                reward, r = experience.reward[k], experience.r[k]
                lines.append(json.dumps({
                    # one id per sample of the run: a sample lost or taken twice by a fault shows here
                    "sample_id": f"{epoch}/{experience.prompt_id}/{k}",
                    "epoch": epoch, "prompt_id": experience.prompt_id, "sample": k, "task": experience.task,
                    "instruction": experience.instruction, "image": name,
                    "reward": None if np.isnan(reward) else float(reward),
                    "rewards": experience.sample_components(k), "weights": experience.weights,
                    "reward_versions": experience.reward_versions, "failed": experience.failed[k],
                    "policy_version": experience.policy_version,
                    "r": None if not np.isfinite(r) else float(r),
                    "filtered": experience.filtered}))
        write_atomic(folder / "rollouts.jsonl", "\n".join(lines) + "\n")
        return folder
