"""Held-out evaluation on the rollout actors: the gold metric per task, grids and text in TensorBoard."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.context import PipelineContext
from actors.rollout_group import gather
from posterrl.data.gold import gold_metric
from posterrl.data.manifest import ManifestRow
from posterrl.images import labelled_grid
from posterrl.policy import SPEC_FILE, EditPolicy
from posterrl.runlog import RunDir


def latest_policy_dir(run: RunDir) -> Path | None:
    """The newest exported policy of this run, in pipeline order (rl after distill)."""
    for stage in ("rl", "distill"):
        path = run.stage_checkpoint(stage)
        if (path / SPEC_FILE).is_file():
            return path
    return None


def eval_rows(rows: list[ManifestRow], per_task: int, tasks: list[str]) -> list[ManifestRow]:
    """The first per_task held-out rows of each task, in task order."""
    chosen: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row.task in tasks and len(chosen[row.task]) < per_task:
            chosen[row.task].append(row)
    return [r for t in tasks for r in chosen[t]]


def evaluate(ctx: PipelineContext, policy_state: dict, label: str, tasks: list[str] | None = None,
             tag_prefix: str = "eval") -> dict[str, float]:
    """Held-out gold metric per task for the given weights, sampled on the rollout actors."""
    cfg = ctx.config
    rows = eval_rows(ctx.rows["val"], cfg.rollout.eval_per_task, tasks or list(cfg.data.tasks))
    group = ctx.rollout_group()
    group.load_weights(policy_state, version=ctx.global_step)
    refs = group.submit(rows, group_size=1, base_seed=cfg.rollout.seed)
    with ctx.progress() as progress:
        bar = progress.add_task(f"eval: sampling {label} ({len(rows)} prompts)", total=len(refs), info="")
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=1)
            progress.update(bar, completed=len(refs) - len(pending))
    groups = gather(refs)

    scores: dict[str, list[float]] = defaultdict(list)
    grid_rows: dict[str, list] = defaultdict(list)
    for row, rollout_group in zip(rows, groups):
        target = row.load_target()
        output = rollout_group.output_images(size=target.size)[0]
        gold = gold_metric(row.task, output, target, row.meta)
        scores[row.task].append(gold)
        grid_rows[row.task].append(([*row.load_inputs(), output, target],
                                    [*(f"input {i}" for i in range(len(row.inputs))), f"out {gold:.2f}", "target"]))
    per_task = {t: float(np.mean(v)) for t, v in scores.items()}
    per_task["mean"] = float(np.mean([per_task[t] for t in scores]))

    if ctx.writer is not None:
        for task, value in per_task.items():
            tag = f"{tag_prefix}/gold_mean" if task == "mean" else f"{tag_prefix}/task/{task}/gold"
            ctx.writer.add_scalar(tag, value, ctx.global_step)
        if cfg.logging.image_grids:
            for task, items in grid_rows.items():
                sheet = labelled_grid([images for images, _ in items], [labels for _, labels in items])
                ctx.writer.add_image(f"{tag_prefix}/{task}", np.asarray(sheet), ctx.global_step, dataformats="HWC")
                text = "\n\n".join(f"`{r.id}`: {r.instruction}" for r in rows if r.task == task)
                ctx.writer.add_text(f"{tag_prefix}/{task}/instructions", text, ctx.global_step)
        ctx.writer.flush()
    return per_task


# Row labels of the gold table for the stage whose export is evaluated.
POLICY_LABELS = {"distill": "student", "rl": "after RL"}


def run_eval(ctx: PipelineContext) -> dict[str, Any]:
    """The final held-out evaluation of the newest policy of the run (untrained if none was trained)."""
    source = latest_policy_dir(ctx.run)
    if source is None:
        policy, label = EditPolicy.from_config(ctx.config.model, ctx.config.rollout), "untrained"
    else:
        policy, label = EditPolicy.from_pretrained(source), POLICY_LABELS[source.name]
    per_task = evaluate(ctx, policy.state_dict(), label)
    export = policy.save_pretrained(ctx.run.stage_checkpoint("eval"))
    ctx.run.record_gold(label, per_task)
    return {"policy": label, "checkpoint": str(export), "per_task_prompts": ctx.config.rollout.eval_per_task,
            "seed": ctx.config.rollout.seed, "gold": per_task}
