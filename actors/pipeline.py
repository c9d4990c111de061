"""The driver: runs the config's stages in order inside one Ray cluster.

Each stage is a function `(PipelineContext) -> figures`, listed in STAGE_RUNNERS, the one place
that says which stages exist. Figures go to summary.json; metrics to TensorBoard.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from actors.cluster import connect
from actors.context import PipelineContext
from actors.data import run_data
from actors.evaluation import run_eval
from actors.reward_stage import run_reward
from actors.rl import run_rl
from actors.training import REGIMES, run_distill, run_sft
from posterrl.config import STAGE_ORDER, Config, ConfigError
from posterrl.data.tasks import TASKS
from posterrl.policy import SPEC_FILE
from posterrl.runlog import RunDir

STAGE_RUNNERS: dict[str, Callable[[PipelineContext], dict[str, Any]]] = {
    "data": run_data,
    "sft": run_sft,
    "distill": run_distill,
    "reward": run_reward,
    "rl": run_rl,
    "eval": run_eval,
}


SHORT_TASK_NAMES = {"extending": "extend", "filling": "fill", "rescaling": "rescale",
                    "identity-driven": "identity", "layout-driven": "layout", "style-driven": "style", "mean": "mean"}


def print_gold_table(console: Console, gold: dict[str, dict[str, float]],
                     title: str = "held-out gold metric (higher is better)") -> None:
    table = Table(title=title)
    table.add_column("policy", no_wrap=True)
    for task in [*TASKS, "mean"]:
        table.add_column(SHORT_TASK_NAMES[task], justify="right")
    for label, per_task in gold.items():
        table.add_row(label, *(f"{per_task[t]:.3f}" if t in per_task else "-" for t in [*TASKS, "mean"]))
    console.print(table)


def run_pipeline(config: Config, run_dir: str | Path, address: str | None = None, resume: bool = False,
                 console: Console | None = None, allow_existing: bool = False,
                 force_config: bool = False) -> dict[str, Any]:
    """Run config.stages in order. allow_existing: add stages to a run directory that holds earlier ones.
    resume: continue the run in run_dir, with the config it saved unless force_config (checked before Ray)."""
    console = console or Console()
    problems = config.runnable_problems(address)
    if problems:
        raise ConfigError("cannot run this config:\n  " + "\n  ".join(problems))
    run = RunDir(run_dir)
    if "distill" in config.stages and "sft" not in config.stages:
        missing = [r for r in REGIMES if not (run.stage_checkpoint("sft") / r / SPEC_FILE).is_file()]
        if missing:
            raise ConfigError(f"distill needs the sft experts: {run.stage_checkpoint('sft')} has no exported "
                              f"{' or '.join(missing)} expert (run `posterrl sft` with this --run-dir first)")
    if run.summary_path.exists() and run.summary().get("stages") and not (resume or allow_existing):
        raise ConfigError(f"run directory {run.root} already holds a run: pass --resume to continue it, "
                          "or choose another --run-dir")
    changes = run.config_changes(config) if resume else []
    if changes and not force_config:
        raise ConfigError(f"--resume: the config differs from the one {run.config_path} was run with:\n  "
                          + "\n  ".join(changes) + "\npass --force-config to resume with the new values "
                          "(they replace config.yaml), or resume with the same config and overrides")
    if changes:
        console.print(f"--resume --force-config: resuming with {len(changes)} changed key(s): " + "; ".join(changes))
    run.create(config)

    sizes = Table(title=f"run {run.root}", show_header=False)
    for key, value in config.derived_sizes().items():
        sizes.add_row(key, f"{value:g}" if isinstance(value, float) else str(value))
    sizes.add_row("stages", " -> ".join(config.stages))
    console.print(sizes)

    connected = connect(config, address, run_dir=run.root)
    writer = SummaryWriter(str(run.tb)) if config.logging.tensorboard else None
    ctx = PipelineContext(config, run, console, writer, resume=resume, global_step=run.summary().get("global_step", 0))
    done = set(run.summary().get("completed", [])) if resume else set()
    try:
        with stop_on_sigint(ctx):
            return run_stages(ctx, done)
    except BaseException as exc:  # the record of what stopped the run; re-raised at once
        summary = run.summary()
        summary["faults"] = ctx.faults.summary()
        summary["stopped"] = {"stage": ctx.stage, "type": type(exc).__name__, "error": str(exc),
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        run.write_summary(summary)
        raise
    finally:
        ctx.shutdown()
        if writer is not None:
            writer.close()
        if connected:
            ray.shutdown()


@contextmanager
def stop_on_sigint(ctx: PipelineContext) -> Iterator[None]:
    """Ctrl-C asks the stages to stop at their next safe point (after a checkpoint); a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def request_stop(signum, frame) -> None:
        if ctx.stop_requested:
            raise KeyboardInterrupt
        ctx.stop_requested = True
        ctx.console.print("[yellow]Ctrl-C: stopping at the next safe point, after a checkpoint "
                          "(Ctrl-C again stops at once)")

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_stages(ctx: PipelineContext, done: set[str]) -> dict[str, Any]:
    """config.stages in order (after a resume, the ones not done yet), each recorded in summary.json."""
    config, run, console = ctx.config, ctx.run, ctx.console
    for stage in config.stages:
        if stage in done and stage != "data":
            console.print(f"[dim]{stage}: done in an earlier attempt, skipped (--resume)")
            continue
        ctx.stop_point(f"the start of stage {stage}")
        ctx.stage = stage
        console.rule(f"stage {stage}")
        started = time.perf_counter()
        figures = STAGE_RUNNERS[stage](ctx)
        figures["seconds"] = round(time.perf_counter() - started, 2)
        run.record_stage(stage, figures)
        summary = run.summary()
        summary["global_step"] = ctx.global_step
        summary["completed"] = sorted(set(summary.get("completed", [])) | {stage}, key=STAGE_ORDER.index)
        summary["faults"] = ctx.faults.summary()
        run.write_summary(summary)
        console.print(f"stage {stage} finished in {figures['seconds']:.1f} s")
    summary = run.summary()
    if "stopped" in summary:  # an earlier attempt's stop, now resumed past
        summary.setdefault("earlier_stops", []).append(summary.pop("stopped"))
        run.write_summary(summary)
    if summary.get("gold"):
        print_gold_table(console, summary["gold"])
    if summary.get("reward"):
        order = [label for label in summary.get("gold", {}) if label in summary["reward"]]
        rows = {label: summary["reward"][label] for label in order + sorted(set(summary["reward"]) - set(order))}
        print_gold_table(console, rows, "learned reward of the same held-out samples (served)")
    if any(ctx.faults.counts.values()):
        console.print("faults survived: " + ", ".join(f"{k} {v}" for k, v in ctx.faults.counts.items() if v))
    console.print(f"run directory: {run.root} (TensorBoard: tensorboard --logdir {run.tb})")
    return summary
