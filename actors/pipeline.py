"""The driver: runs the config's stages in order inside one Ray cluster.

Each stage is a function `(PipelineContext) -> figures`, listed in STAGE_RUNNERS, the one place
that says which stages exist. Figures go to summary.json; metrics to TensorBoard.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from actors.cluster import connect
from actors.data import generate_split, is_generated
from actors.rollout_group import RolloutActorGroup
from posterrl.config import STAGE_ORDER, Config, ConfigError
from posterrl.data.gold import gold_metric
from posterrl.data.manifest import ManifestRow, load_manifest, summarize_skips
from posterrl.data.sheet import task_counts
from posterrl.data.tasks import TASKS
from posterrl.images import labelled_grid
from posterrl.policy import SPEC_FILE, EditPolicy
from posterrl.runlog import RunDir
from rollout.worker import RolloutGroup


@dataclass
class PipelineContext:
    config: Config
    run: RunDir
    console: Console
    writer: SummaryWriter | None
    resume: bool = False
    global_step: int = 0  # learner steps over all stages so far: the x axis of TensorBoard
    manifests: dict[str, Path] = field(default_factory=dict)  # split -> manifest
    _rollouts: RolloutActorGroup | None = None
    _learners: "LearnerGroup | None" = None

    def progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=self.console,
                        disable=not self.config.logging.progress, transient=False)

    def rollout_group(self) -> RolloutActorGroup:
        """Started on first use and kept for the whole run."""
        if self._rollouts is None:
            self._rollouts = RolloutActorGroup(self.config)
        return self._rollouts

    def learner_group(self) -> "LearnerGroup":
        """Started on first use; the same ranks serve every training stage."""
        if self._learners is None:
            from actors.learner_group import LearnerGroup

            self._learners = LearnerGroup(self.config)
        return self._learners

    def scalars(self, values: dict[str, float], step: int | None = None) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, self.global_step if step is None else step)

    def shutdown(self) -> None:
        if self._learners is not None:
            self._learners.shutdown()
        if self._rollouts is not None:
            self._rollouts.shutdown()


# ------------------------------------------------------------------------- data


def run_data(ctx: PipelineContext) -> dict[str, Any]:
    d = ctx.config.data
    if d.train_manifest:
        figures: dict[str, Any] = {"source": "user manifests"}
        for split, path in (("train", d.train_manifest), ("val", d.val_manifest or d.train_manifest)):
            load = load_manifest(path, require_target=True)
            if load.skipped:
                ctx.console.print(f"[yellow]{summarize_skips(load)}")
            ctx.manifests[split] = Path(path)
            figures[split] = {"rows": len(load.rows), "skipped": load.skipped, "per_task": task_counts(load.rows)}
        return figures

    root = ctx.run.data_dir(ctx.config)
    figures = {"source": "generated", "dir": str(root), "seed": d.seed, "size": d.size}
    # Held-out posters take the indices after the training ones: same generator, disjoint posters.
    for split, start, n in (("train", 0, d.n_train), ("val", d.n_train, d.n_val)):
        out = root / split
        if is_generated(out, split, start, n, d.seed, d.size, list(d.tasks)):
            ctx.console.print(f"data: {out} already holds this split, kept")
        else:
            with ctx.progress() as progress:
                bar = progress.add_task(f"data: generating {split} ({n} posters)", total=d.chunks, info="")
                generate_split(out, split, start, n, d.seed, d.size, list(d.tasks), min(d.chunks, n),
                               on_chunk_done=lambda done, total: progress.update(bar, completed=done, total=total))
        load = load_manifest(out / "manifest.jsonl", require_target=True)
        ctx.manifests[split] = out / "manifest.jsonl"
        figures[split] = {"posters": n, "rows": len(load.rows), "skipped": load.skipped,
                          "per_task": task_counts(load.rows)}
    return figures


# ------------------------------------------------------------------------- eval


def latest_policy_dir(run: RunDir) -> Path | None:
    """The newest exported policy of this run, in pipeline order (rl after distill)."""
    for stage in ("rl", "distill"):
        path = run.stage_checkpoint(stage)
        if (path / SPEC_FILE).is_file():
            return path
    return None


def eval_rows(manifest: Path, per_task: int, tasks: list[str]) -> list[ManifestRow]:
    rows = load_manifest(manifest, require_target=True).rows
    chosen: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row.task in tasks and len(chosen[row.task]) < per_task:
            chosen[row.task].append(row)
    return [r for t in tasks for r in chosen[t]]


def evaluate(ctx: PipelineContext, policy_state: dict, label: str, tasks: list[str] | None = None,
             tag_prefix: str = "eval") -> dict[str, float]:
    """Held-out gold metric per task for the given weights, sampled on the rollout actors."""
    cfg = ctx.config
    manifest = ctx.manifests.get("val") or Path(cfg.data.val_manifest)
    rows = eval_rows(manifest, cfg.rollout.eval_per_task, tasks or list(cfg.data.tasks))
    group = ctx.rollout_group()
    group.load_weights(policy_state, version=ctx.global_step)
    refs = group.submit(rows, group_size=1, base_seed=cfg.rollout.seed)
    with ctx.progress() as progress:
        bar = progress.add_task(f"eval: sampling {label} ({len(rows)} prompts)", total=len(refs), info="")
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=1)
            progress.update(bar, completed=len(refs) - len(pending))
    groups: list[RolloutGroup] = [g for share in ray.get(refs) for g in share]

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


def run_sft(ctx: PipelineContext) -> dict[str, Any]:
    from actors.training import run_sft as sft

    return sft(ctx)


def run_distill(ctx: PipelineContext) -> dict[str, Any]:
    from actors.training import run_distill as distill

    return distill(ctx)


STAGE_RUNNERS: dict[str, Callable[[PipelineContext], dict[str, Any]]] = {
    "data": run_data,
    "sft": run_sft,
    "distill": run_distill,
    "eval": run_eval,
}


# ------------------------------------------------------------------------- driver


SHORT_TASK_NAMES = {"extending": "extend", "filling": "fill", "rescaling": "rescale",
                    "identity-driven": "identity", "layout-driven": "layout", "style-driven": "style", "mean": "mean"}


def print_gold_table(console: Console, gold: dict[str, dict[str, float]]) -> None:
    table = Table(title="held-out gold metric (higher is better)")
    table.add_column("policy", no_wrap=True)
    for task in [*TASKS, "mean"]:
        table.add_column(SHORT_TASK_NAMES[task], justify="right")
    for label, per_task in gold.items():
        table.add_row(label, *(f"{per_task[t]:.3f}" if t in per_task else "-" for t in [*TASKS, "mean"]))
    console.print(table)


def run_pipeline(config: Config, run_dir: str | Path, address: str | None = None, resume: bool = False,
                 console: Console | None = None, allow_existing: bool = False) -> dict[str, Any]:
    """Run config.stages in order. allow_existing: add stages to a run directory that holds earlier ones."""
    console = console or Console()
    problems = config.runnable_problems()
    if problems:
        raise ConfigError("cannot run this config:\n  " + "\n  ".join(problems))
    run = RunDir(run_dir)
    if run.summary_path.exists() and run.summary().get("stages") and not (resume or allow_existing):
        raise ConfigError(f"run directory {run.root} already holds a run: pass --resume to continue it, "
                          "or choose another --run-dir")
    run.create(config)

    sizes = Table(title=f"run {run.root}", show_header=False)
    for key, value in config.derived_sizes().items():
        sizes.add_row(key, f"{value:g}" if isinstance(value, float) else str(value))
    sizes.add_row("stages", " -> ".join(config.stages))
    console.print(sizes)

    connect(config, address)
    writer = SummaryWriter(str(run.tb)) if config.logging.tensorboard else None
    ctx = PipelineContext(config, run, console, writer, resume=resume, global_step=run.summary().get("global_step", 0))
    done = set(run.summary().get("completed", [])) if resume else set()
    try:
        for stage in config.stages:
            if stage in done and stage != "data":
                console.print(f"[dim]{stage}: done in an earlier attempt, skipped (--resume)")
                continue
            console.rule(f"stage {stage}")
            started = time.perf_counter()
            figures = STAGE_RUNNERS[stage](ctx)
            figures["seconds"] = round(time.perf_counter() - started, 2)
            run.record_stage(stage, figures)
            summary = run.summary()
            summary["global_step"] = ctx.global_step
            summary["completed"] = sorted(set(summary.get("completed", [])) | {stage}, key=STAGE_ORDER.index)
            run.write_summary(summary)
            console.print(f"stage {stage} finished in {figures['seconds']:.1f} s")
        summary = run.summary()
        summary["global_step"] = ctx.global_step
        run.write_summary(summary)
        if summary.get("gold"):
            print_gold_table(console, summary["gold"])
        console.print(f"run directory: {run.root} (TensorBoard: tensorboard --logdir {run.tb})")
        return summary
    finally:
        ctx.shutdown()
        if writer is not None:
            writer.close()
