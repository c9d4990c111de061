"""`posterrl` command line: run, sft, distill, rl, reward, config, data generate|show, sample."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from posterrl.config import Config, ConfigDeprecationWarning, load_config
from posterrl.errors import UserError
from posterrl.names import JUDGE_BACKENDS, SCORER_KINDS, SOLVER_NAMES

console = Console(soft_wrap=True)  # messages stay on one line, so they can be grepped


def load(path: str | Path, overrides: list[str]) -> Config:
    """load_config, printing once each key that moved (the config was migrated and runs as before)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigDeprecationWarning)
        try:
            return load_config(path, overrides)
        finally:
            for warning in caught:
                if issubclass(warning.category, ConfigDeprecationWarning):
                    console.print(f"[yellow]warning:[/yellow] {escape(str(warning.message))}", highlight=False)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def cmd_run(args: argparse.Namespace) -> int:
    config = load(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    from actors.pipeline import run_pipeline  # imports ray: only when a run starts

    run_pipeline(config, run_dir, address=args.address, resume=args.resume, console=console)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """`posterrl sft|distill|rl CONFIG`, `posterrl reward train CONFIG`: that stage alone, after `data`
    (which keeps data already generated)."""
    stage = "reward" if args.command == "reward" else args.command
    stages = "data,rl,eval" if stage == "rl" else f"data,{stage}"  # rl ends with the held-out evaluation
    config = load(args.config, [*args.overrides, f"stages=[{stages}]"])
    run_dir = args.run_dir or Path("runs") / f"{Path(args.config).stem}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    from actors.pipeline import run_pipeline

    run_pipeline(config, run_dir, address=args.address, resume=args.resume, console=console,
                 allow_existing=stage in ("distill", "reward", "rl"))
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    if args.reward_command == "train":
        return cmd_stage(args)
    from actors.reward_cli import run_reward_command  # imports ray: only for a live change

    return run_reward_command(args, console)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    config = load(args.config, args.overrides)
    console.print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    for key, value in config.derived_sizes().items():
        console.print(f"# {key}: {value}")
    problems = config.runnable_problems()
    for problem in problems:
        console.print(f"[yellow]# not runnable here: {problem}")
    console.print(f"[green]{args.config}: valid")
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    from posterrl.data.tasks import TASKS, generate_dataset

    unknown = sorted(set(args.tasks or ()) - set(TASKS))
    if unknown:
        raise UserError(f"--tasks {unknown}: expected names from {', '.join(TASKS)}")
    manifest = generate_dataset(args.out, n=args.n, seed=args.seed, size=args.size, split=args.split,
                                tasks=tuple(args.tasks or TASKS))
    console.print(f"wrote {manifest}")
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from posterrl.data.manifest import load_manifest, summarize_skips
    from posterrl.data.sheet import contact_sheet, task_counts

    path = Path(args.path)
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    load = load_manifest(manifest)
    if load.skipped:
        console.print(f"[yellow]{summarize_skips(load)}")
    for task, count in task_counts(load.rows).items():
        console.print(f"{task:>16}: {count}")
    console.print(f"{'total':>16}: {len(load.rows)}")
    out = Path(args.out) if args.out else manifest.parent / "contact_sheet.png"
    contact_sheet(load.rows, out)
    console.print(f"contact sheet: {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from collections import defaultdict

    import numpy as np

    from posterrl.data.gold import gold_metric
    from posterrl.data.manifest import load_manifest, summarize_skips, write_manifest
    from posterrl.data.tasks import build_samples, write_samples
    from posterrl.flow import SamplerConfig
    from posterrl.images import labelled_grid
    from rollout.worker import RolloutWorker

    worker = RolloutWorker(checkpoint=args.checkpoint)
    spec = worker.policy.spec
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.manifest:
        manifest = Path(args.manifest)
    else:
        inputs_dir = out / "inputs"
        rows = []
        for index in range(args.n):
            samples = build_samples(index, args.seed, args.size or spec.resolution, tasks=(args.task,), split="sample")
            rows.extend(write_samples(samples, inputs_dir))
        manifest = inputs_dir / "manifest.jsonl"
        write_manifest(rows, manifest)
    load = load_manifest(manifest)
    if load.skipped:
        console.print(f"[yellow]{summarize_skips(load)}")

    sampler = SamplerConfig(args.solver or spec.sampler.solver, args.steps or spec.sampler.num_steps,
                            spec.sampler.shift)
    groups = worker.sample(load.rows, group_size=1, base_seed=args.seed, sampler=sampler)
    grid, labels, gold = [], [], defaultdict(list)
    for row, group in zip(load.rows, groups, strict=True):
        target = row.load_target()
        image = group.output_images(size=target.size if target is not None else None)[0]
        image.save(out / f"{row.id}.png")
        cells, names = [*row.load_inputs(), image], [*(f"input {i}" for i in range(len(row.inputs))), "output"]
        if target is not None:
            score = gold_metric(row.task, image, target, row.meta)
            gold[row.task].append(score)
            cells.append(target)
            names += ["target"]
            names[-2] = f"out {score:.2f}"
        grid.append(cells)
        labels.append(names)
    labelled_grid(grid, labels).save(out / "grid.png")
    console.print(f"wrote {len(groups)} images and grid.png to {out} "
                  f"({sampler.solver}, {sampler.num_steps} steps, seed {args.seed})")
    for task, scores in gold.items():
        console.print(f"gold {task}: {np.mean(scores):.3f} over {len(scores)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posterrl", description="RL for diffusion poster-edit models on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stages of a config in one Ray cluster")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.lr=1e-4 rollout.group_size=8")
    run.add_argument("--run-dir", type=Path, help="run directory (default runs/<config>-<time>)")
    run.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    run.set_defaults(func=cmd_run)

    for stage, text in (("sft", "train the local-editing and global-creation experts"),
                        ("distill", "distill the experts of a run directory into one student"),
                        ("rl", "DiffusionNFT on a run directory's student with its reward server, then evaluate")):
        one = sub.add_parser(stage, help=f"{text} (the {stage} stage alone)")
        one.add_argument("config")
        one.add_argument("overrides", nargs="*")
        one.add_argument("--run-dir", type=Path, help="run directory (distill: the one holding the sft experts; "
                                                     "rl: the one holding the student and the reward model)")
        one.add_argument("--address")
        one.add_argument("--resume", action="store_true")
        one.set_defaults(func=cmd_stage)

    add_reward_parser(sub)

    cfg = sub.add_parser("config", help="validate a config and print it resolved, with derived sizes")
    cfg.add_argument("config")
    cfg.add_argument("overrides", nargs="*")
    cfg.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="poster datasets").add_subparsers(dest="data_command", required=True)
    gen = data.add_parser("generate", help="procedural posters: one sample of each task per poster")
    gen.add_argument("--out", required=True, type=Path)
    gen.add_argument("--n", required=True, type=int, help="number of posters")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=64, help="long side of a poster, px")
    gen.add_argument("--split", default="train")
    gen.add_argument("--tasks", nargs="+", help="subset of tasks (default all six)")
    gen.set_defaults(func=cmd_data_generate)
    show = data.add_parser("show", help="counts per task and a contact sheet")
    show.add_argument("path", help="a dataset directory or a manifest.jsonl")
    show.add_argument("--out", help="contact sheet PNG (default next to the manifest)")
    show.set_defaults(func=cmd_data_show)

    sample = sub.add_parser("sample", help="sample edits with an exported policy")
    sample.add_argument("--checkpoint", required=True, help="an exported policy: <run_dir>/checkpoints/<stage>")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSONL manifest of prompts")
    source.add_argument("--task", help="generate --n fresh prompts of this task")
    sample.add_argument("--n", type=int, default=4)
    sample.add_argument("--out", required=True)
    sample.add_argument("--steps", type=int, help="ODE steps (default: the checkpoint's)")
    sample.add_argument("--solver", choices=list(SOLVER_NAMES), help="default: the checkpoint's")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--size", type=int, help="poster size for --task (default: the policy's canvas)")
    sample.set_defaults(func=cmd_sample)
    return parser


def add_reward_parser(sub: argparse._SubParsersAction) -> None:
    reward = sub.add_parser("reward", help="train a reward model, or change a live run's reward registry")
    commands = reward.add_subparsers(dest="reward_command", required=True)
    train = commands.add_parser("train", help="the reward stage alone: preference pairs from the run's newest "
                                              "policy, a Bradley-Terry model trained on the learner group")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*")
    train.add_argument("--run-dir", type=Path, help="the run directory holding the policy to sample pairs from")
    train.add_argument("--address")
    train.add_argument("--resume", action="store_true")
    train.set_defaults(func=cmd_reward)

    def live(name: str, text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=text)
        parser.add_argument("--run", required=True, help="the run directory of a running job")
        parser.add_argument("--address", help="the Ray cluster (default: the address in RUN/cluster.json)")
        parser.set_defaults(func=cmd_reward)
        return parser

    kinds, backends = list(SCORER_KINDS), list(JUDGE_BACKENDS)
    live("list", "the scorers, weights and versions serving now")
    add = live("add", "load, probe and register a new scorer (weight 0: shadow, scored and logged, not counted)")
    add.add_argument("--name", required=True)
    add.add_argument("--kind", required=True, choices=kinds)
    add.add_argument("--weight", type=float, default=0.0)
    add.add_argument("--path")
    add.add_argument("--backend", choices=backends)
    add.add_argument("--url")
    swap = live("swap", "replace a scorer's model; the old one serves until the new one has passed its probe")
    swap.add_argument("--name", required=True)
    swap.add_argument("--path")
    swap.add_argument("--backend", choices=backends)
    swap.add_argument("--url")
    remove = live("remove", "stop using a scorer")
    remove.add_argument("--name", required=True)
    weight = live("set-weight", "change a scorer's weight (0 moves it to shadow)")
    weight.add_argument("--name", required=True)
    weight.add_argument("--weight", type=float, required=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "task", None):
        from posterrl.data.tasks import TASKS

        if args.task not in TASKS:
            parser.error(f"--task {args.task!r}: expected one of {', '.join(TASKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from posterrl.policy import quiet_model_libraries

    quiet_model_libraries()
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
