"""Held-out evaluation on the rollout actors: the gold metric per task, grids and text in TensorBoard."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.context import PipelineContext
from actors.faults import ask_restartable
from posterrl.data.gold import gold_metric, known_region_psnr
from posterrl.data.manifest import ManifestRow
from posterrl.images import labelled_grid
from posterrl.models.samples import EditSample
from posterrl.policies import build_policy, load_policy
from posterrl.policy import SPEC_FILE
from posterrl.runlog import RunDir


def latest_policy_dir(run: RunDir) -> Path | None:
    """The newest exported policy of this run, in pipeline order (rl after distill)."""
    for stage in ("rl", "distill"):
        path = run.stage_checkpoint(stage)
        if (path / SPEC_FILE).is_file():
            return path
    return None


def eval_rows(rows: list[ManifestRow], per_task: int, tasks: Sequence[str]) -> list[ManifestRow]:
    """The first per_task held-out rows of each task, in task order."""
    chosen: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row.task in tasks and len(chosen[row.task]) < per_task:
            chosen[row.task].append(row)
    return [r for t in tasks for r in chosen[t]]


@dataclass
class Evaluation:
    """Per task (and "mean"): the held-out gold metric, and the served reward when a reward server runs; for
    extending and filling, the PSNR of the known region against the input (posterrl.data.gold.known_region_psnr)."""

    gold: dict[str, float]
    reward: dict[str, float] = field(default_factory=dict)
    known_psnr: dict[str, float] = field(default_factory=dict)

    def record(self, run: RunDir, label: str) -> None:
        run.record_gold(label, self.gold)
        if self.reward:
            run.record_reward(label, self.reward)
        if self.known_psnr:
            run.record_known_psnr(label, self.known_psnr)


def task_means(values: dict[str, list[float]]) -> dict[str, float]:
    """The mean per task, and over the tasks' means as "mean" (when there is any task)."""
    means = {t: float(np.mean(v)) for t, v in values.items()}
    if means:
        means["mean"] = float(np.mean(list(means.values())))
    return means


def served_rewards(ctx: PipelineContext, samples: list[EditSample]) -> dict[str, float]:
    """Mean combined reward per task from the run's reward server (samples it drops are left out)."""
    server = ctx.reward_server()
    results = ask_restartable(lambda: server.score.remote(samples, ctx.global_step), ctx.config.cluster.call_timeout_s,
                              "the reward server (evaluation)")
    per_task: dict[str, list[float]] = defaultdict(list)
    for sample, result in zip(samples, results, strict=True):
        if result.reward is not None:
            per_task[sample.task].append(result.reward)
    return task_means(per_task)


def evaluate(ctx: PipelineContext, policy_state: dict | None, label: str, tasks: Sequence[str] | None = None,
             tag_prefix: str = "eval", version: int | None = None) -> Evaluation:
    """Held-out gold metric per task for the given weights, sampled on the rollout actors; with a
    reward server running (after the reward stage), the learned reward of the same samples too.

    policy_state None evaluates the weights the rollout actors hold (the rl stage's published ones).
    """
    cfg = ctx.config
    rows = eval_rows(ctx.rows["val"], cfg.rollout.eval_per_task, tasks or list(cfg.data.tasks))
    group = ctx.rollout_group()
    if policy_state is not None:
        group.load_weights(policy_state, ctx.global_step if version is None else version, ctx.faults)
    chunks = group.submit(rows, group_size=1, base_seed=cfg.rollout.seed)
    ctx.wait_with_progress([c.ref for c in chunks], f"eval: sampling {label} ({len(rows)} prompts)")
    groups = group.gather(chunks, f"eval {label}", ctx.faults)

    scores: dict[str, list[float]] = defaultdict(list)
    known: dict[str, list[float]] = defaultdict(list)
    grid_rows: dict[str, list] = defaultdict(list)
    edits: list[EditSample] = []
    for row, rollout_group in zip(rows, groups, strict=True):
        target, inputs = row.require_target(), row.load_inputs()
        output = rollout_group.output_images(size=target.size)[0]
        edits.append(EditSample(row.id, row.task, row.instruction, inputs, output, row.meta, target))
        gold = gold_metric(row.task, output, target, row.meta)
        scores[row.task].append(gold)
        psnr = known_region_psnr(row.task, output, inputs[0], row.meta)
        if psnr is not None:
            known[row.task].append(psnr)
        grid_rows[row.task].append(([*inputs, output, target],
                                    [*(f"input {i}" for i in range(len(row.inputs))), f"out {gold:.2f}", "target"]))
    per_task = task_means(scores)
    known_psnr = {t: float(np.mean(v)) for t, v in known.items()}
    reward = served_rewards(ctx, edits) if ctx.reward_available() else {}

    if ctx.writer is not None:
        for metric, values in (("gold", per_task), ("reward", reward), ("known_psnr", known_psnr)):
            for task, value in values.items():
                tag = f"{tag_prefix}/{metric}_mean" if task == "mean" else f"{tag_prefix}/task/{task}/{metric}"
                ctx.writer.add_scalar(tag, value, ctx.global_step)
        if cfg.logging.image_grids:
            for task, items in grid_rows.items():
                sheet = labelled_grid([images for images, _ in items], [labels for _, labels in items])
                ctx.writer.add_image(f"{tag_prefix}/{task}", np.asarray(sheet), ctx.global_step, dataformats="HWC")
                text = "\n\n".join(f"`{r.id}`: {r.instruction}" for r in rows if r.task == task)
                ctx.writer.add_text(f"{tag_prefix}/{task}/instructions", text, ctx.global_step)
        ctx.writer.flush()
    return Evaluation(per_task, reward, known_psnr)


BASELINE_LABEL = "unedited input"  # the gold table's first row: the trivial edit every trained row must beat


def unedited_input_gold(ctx: PipelineContext) -> Evaluation:
    """The trivial baseline on the prompts `evaluate` samples: each row's first input, resized to the target's
    size, as the output (docs/gold_metrics.md's "unedited input")."""
    rows = eval_rows(ctx.rows["val"], ctx.config.rollout.eval_per_task, list(ctx.config.data.tasks))
    scores: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        target = row.require_target()
        scores[row.task].append(gold_metric(row.task, row.load_inputs()[0].resize(target.size), target, row.meta))
    return Evaluation(task_means(scores))


# Row labels of the gold table for the stage whose export is evaluated.
POLICY_LABELS = {"distill": "student", "rl": "after RL"}


def run_eval(ctx: PipelineContext) -> dict[str, Any]:
    """The final held-out evaluation of the newest policy of the run (untrained if none was trained)."""
    source = latest_policy_dir(ctx.run)
    if source is None:
        policy, label = build_policy(ctx.config.model, ctx.config.rollout), "untrained"
    else:
        policy, label = load_policy(source), POLICY_LABELS[source.name]
    evaluation = evaluate(ctx, policy.policy_state(), label)
    export = policy.save_pretrained(ctx.run.stage_checkpoint("eval"))
    evaluation.record(ctx.run, label)
    figures = {"policy": label, "checkpoint": str(export), "per_task_prompts": ctx.config.rollout.eval_per_task,
               "seed": ctx.config.rollout.seed, "gold": evaluation.gold, "reward": evaluation.reward}
    if label == "after RL":
        figures["final_table"] = final_table(ctx)
    return figures


def final_table(ctx: PipelineContext) -> dict[str, dict[str, dict[str, float]]]:
    """Rows untrained, student, after RL: held-out gold and learned reward per task.

    The untrained and student rows were evaluated before a reward model existed (their gold is on
    record); their learned reward is measured now on the same held-out samples.
    """
    summary = ctx.run.summary()
    sources = {"untrained": None, "student": ctx.run.stage_checkpoint("distill")}
    for label, source in sources.items():
        if label in summary["gold"] and label not in summary.get("reward", {}) and ctx.reward_available():
            policy = build_policy(ctx.config.model, ctx.config.rollout) if source is None else load_policy(source)
            ctx.run.record_reward(label, evaluate(ctx, policy.policy_state(), label, tag_prefix="final").reward)
    summary = ctx.run.summary()
    return {label: {"gold": summary["gold"][label], "reward": summary.get("reward", {}).get(label, {})}
            for label in ("untrained", "student", "after RL") if label in summary["gold"]}
