"""Training stages on the learner group: `sft` (one expert per regime) and `distill` (one student)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.context import PipelineContext
from actors.evaluation import BASELINE_LABEL, evaluate, unedited_input_gold
from learner.data import BatchPlan
from posterrl.checkpoints import latest_checkpoint
from posterrl.config import ConfigError, DistillConfig, SftConfig
from posterrl.data.manifest import ManifestRow
from posterrl.data.tasks import REGIME
from posterrl.policies import build_policy, load_policy
from posterrl.policy import SPEC_FILE

REGIMES = ("local", "global")
LATENT_DIR = "latents"  # <run>/latents/: a latent-space policy's target latents (learner/latent_cache.py)


def train_policy(ctx: PipelineContext, name: str, rows: list[ManifestRow], task: str,
                 stage: SftConfig | DistillConfig, steps: int, task_inputs: dict[str, Any], export_dir: Path,
                 eval_tasks: Sequence[str]) -> dict[str, Any]:
    """Run learner task `task` (started with `task_inputs`) for `steps` with the stage section's batch size,
    evaluation and checkpoint intervals, evaluating, checkpointing, then exporting to export_dir."""
    lc = ctx.config.learner
    group = ctx.learner_group()
    group.start(task, lc.seed, **task_inputs)
    checkpoint_dir = ctx.run.checkpoints / "deepspeed" / name
    start = 0
    if ctx.resume and latest_checkpoint(checkpoint_dir) is not None:  # a torn latest.json stops here, named
        start = group.call("load_checkpoint", str(checkpoint_dir))[0]["data_position"]
        ctx.console.print(f"{name}: resumed from {checkpoint_dir} at step {start}")
    base_step = ctx.global_step  # TensorBoard x of this stage's step 0
    plan = BatchPlan(rows, stage.batch_size, lc.seed)
    last: dict[str, float] = {}
    with ctx.progress() as progress:
        bar = progress.add_task(f"{name}", total=steps, completed=start, info="")
        for step in range(start, steps):
            began = time.perf_counter()
            stats = group.train_step(plan.batch(step))
            ctx.global_step = base_step + step + 1
            elapsed = time.perf_counter() - began
            last = {"learner/loss": stats.loss, "learner/lr": stats.lr, "learner/grad_norm": stats.grad_norm,
                    "perf/samples_per_s": stats.samples / elapsed,
                    **{f"learner/{k}": v for k, v in stats.extra.items() if k != "loss"}}
            ctx.scalars(last)
            progress.update(bar, completed=step + 1, info=f"loss {stats.loss:.4f}")
            if (step + 1) % stage.eval_every == 0 and step + 1 < steps:
                progress.stop()
                evaluate(ctx, group.policy_state(), f"{name} step {step + 1}", eval_tasks)
                progress.start()
            if step + 1 < steps and ((step + 1) % stage.checkpoint_every == 0 or ctx.stop_requested):
                group.call("save_checkpoint", str(checkpoint_dir), {"data_position": step + 1}, lc.keep_checkpoints)
                ctx.stop_point(f"{name} step {step + 1}, after its checkpoint")
    ctx.global_step = base_step + steps
    group.call("save_checkpoint", str(checkpoint_dir), {"data_position": steps}, lc.keep_checkpoints)
    group.call("export", str(export_dir))
    return {"steps": steps, "final": last, "export": str(export_dir)}


def run_sft(ctx: PipelineContext) -> dict[str, Any]:
    """One expert per regime (local editing, global creation), each from the config's initial weights."""
    cfg = ctx.config
    rows = ctx.train_rows()
    if BASELINE_LABEL not in ctx.run.summary().get("gold", {}):
        unedited_input_gold(ctx).record(ctx.run, BASELINE_LABEL)
    if "untrained" not in ctx.run.summary().get("gold", {}):
        untrained = build_policy(cfg.model, cfg.rollout).policy_state()
        evaluate(ctx, untrained, "untrained").record(ctx.run, "untrained")
    figures: dict[str, Any] = {}
    for regime in REGIMES:
        export_dir = ctx.run.stage_checkpoint("sft") / regime
        label = f"{regime} expert"
        if ctx.resume and (export_dir / SPEC_FILE).is_file() and label in ctx.run.summary().get("gold", {}):
            ctx.console.print(f"sft: {label} already exported at {export_dir}, kept (--resume)")
            continue
        regime_rows = [r for r in rows if REGIME[r.task] == regime]
        regime_tasks = [t for t in cfg.data.tasks if REGIME[t] == regime]
        if not regime_rows:
            raise ConfigError(f"sft: no training rows of the {regime} regime (data.tasks={cfg.data.tasks})")
        figures[regime] = train_policy(ctx, f"sft_{regime}", regime_rows, "sft", cfg.sft, cfg.sft.steps_for(regime),
                                       {"latent_cache": str(ctx.run.root / LATENT_DIR)}, export_dir, regime_tasks)
        evaluation = evaluate(ctx, load_policy(export_dir).policy_state(), label)
        evaluation.record(ctx.run, label)
        figures[regime]["gold"] = evaluation.gold
    return figures


def run_distill(ctx: PipelineContext) -> dict[str, Any]:
    """One student from both experts: flow matching on data + lambda_E * ||v_student - v_expert||^2.

    The frozen experts live on every learner rank beside the student (teacher forwards only, no
    optimizer state), so each rank computes expert velocities for its own shard with no extra
    communication; at real-model scale they would be ZeRO-3 partitioned or served by separate actors.
    The student starts from distill.init: an expert's weights (default the local one: four of
    the six tasks) or the config's initialisation.
    """
    cfg = ctx.config
    experts = {}
    for regime in REGIMES:
        path = ctx.run.stage_checkpoint("sft") / regime
        if not (path / SPEC_FILE).is_file():
            raise ConfigError(f"distill needs the sft experts: {path} has no exported policy (run the sft stage first)")
        experts[regime] = load_policy(path).policy_state()
    export_dir = ctx.run.stage_checkpoint("distill")
    init = experts[cfg.distill.init] if cfg.distill.init != "config" else None
    inputs = {"expert_states": experts, "init_state": init, "latent_cache": str(ctx.run.root / LATENT_DIR)}
    figures = train_policy(ctx, "distill", ctx.train_rows(), "distill", cfg.distill, cfg.distill.steps, inputs,
                           export_dir, list(cfg.data.tasks))
    evaluation = evaluate(ctx, load_policy(export_dir).policy_state(), "student")
    evaluation.record(ctx.run, "student")
    figures["gold"] = evaluation.gold
    return figures
