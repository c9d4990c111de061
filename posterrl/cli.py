"""`posterrl` command line: run, sft, distill, rl, reward, config, data generate|show, sample, model make-tiny."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from posterrl.config import Config, ConfigDeprecationWarning, DataConfig, load_config
from posterrl.config.schema import field_range
from posterrl.config.validate import name_problem, scorer_problems, url_problem, weight_problem
from posterrl.errors import Interrupted, UserError
from posterrl.names import JUDGE_BACKENDS, PIPELINE_MODEL_KINDS, SCORER_KINDS, SOLVER_NAMES

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

    run_pipeline(config, run_dir, address=args.address, resume=args.resume, console=console,
                 force_config=args.force_config)
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
                 allow_existing=stage in ("distill", "reward", "rl"), force_config=args.force_config)
    return 0


def check_reward_change(args: argparse.Namespace) -> None:
    """What `posterrl reward list|add|swap|remove|set-weight` can check before joining the run's cluster: the
    run directory, the change's options (the same checks as the config's reward.scorers), the Ray address in
    RUN/cluster.json (filled into args.address)."""
    run_dir, command = Path(args.run), args.reward_command
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: no such run directory")
    problems: list[str | None] = []
    if command == "add":
        problems += scorer_problems(args.name, args.kind, args.weight, args.path, args.backend, args.url, flag="--")
    elif command == "swap":
        problems += [name_problem(args.name, "--"), url_problem(args.url, "--")]
    elif command == "set-weight":
        problems += [name_problem(args.name, "--"), weight_problem(args.weight, "--")]
    elif command == "remove":
        problems += [name_problem(args.name, "--")]
    found = [problem for problem in problems if problem]
    if found:
        raise UserError(f"posterrl reward {command}: {'; '.join(found)}. Nothing was sent to the run")
    if not args.address:
        from posterrl.runlog import read_cluster_file

        args.address = read_cluster_file(run_dir)["address"]


def cmd_reward(args: argparse.Namespace) -> int:
    if args.reward_command == "train":
        return cmd_stage(args)
    check_reward_change(args)  # before Ray is imported
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


def output_dir(path: Path, option: str, given: Path | None = None) -> Path:
    """Create `path`, a directory a command writes into, or a UserError naming the option, what was given for it
    (`given`, default `path`) and why not (a file on the way, no permission), before any work is done."""
    where = f"{option} {given or path}"
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UserError(f"{where}: {ancestor} is a file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{where}: cannot write to {path} ({exc.strerror or exc})") from None
    return path


def check_count(value: int, option: str, what: str) -> None:
    if value < 1:
        raise UserError(f"{option} {value}: expected a number of {what} >= 1")


def check_poster_size(size: int, option: str = "--size") -> None:
    """The bounds of data.size (posterrl/config/schema.py), so the command makes what a run could."""
    low, high = field_range(DataConfig, "size")
    if not low <= size <= high:
        raise UserError(f"{option} {size}: expected a poster size from {low} to {high} px (the range of data.size)")


def cmd_data_generate(args: argparse.Namespace) -> int:
    from posterrl.data.tasks import TASKS, check_split, generate_dataset

    unknown = sorted(set(args.tasks or ()) - set(TASKS))
    if unknown:
        raise UserError(f"--tasks {unknown}: expected names from {', '.join(TASKS)}")
    check_count(args.n, "--n", "posters")
    check_poster_size(args.size)
    check_split(args.split, "--split")
    manifest = generate_dataset(output_dir(args.out, "--out"), n=args.n, seed=args.seed, size=args.size,
                                split=args.split, tasks=tuple(args.tasks or TASKS))
    console.print(f"wrote {manifest}")
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from PIL import Image

    from posterrl.data.manifest import load_manifest, summarize_skips
    from posterrl.data.sheet import contact_sheet, task_counts

    path = Path(args.path)
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    out = Path(args.out) if args.out else manifest.parent / "contact_sheet.png"
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; expected the contact sheet's file name, e.g. {out}/sheet.png")
    if out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {out}: expected an image file name such as contact_sheet.png")
    load = load_manifest(manifest)
    output_dir(out.parent, "--out", given=out)
    if load.skipped:
        console.print(f"[yellow]{summarize_skips(load)}")
    for task, count in task_counts(load.rows).items():
        console.print(f"{task:>16}: {count}")
    console.print(f"{'total':>16}: {len(load.rows)}")
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
    from posterrl.policy import PolicySpec
    from rollout.worker import RolloutWorker

    spec = PolicySpec.load(args.checkpoint)  # the spec alone: the input is checked before the weights load
    if args.steps is not None:
        check_count(args.steps, "--steps", "ODE steps")
    if not args.manifest:
        check_count(args.n, "--n", "prompts")
        if args.size is not None:
            check_poster_size(args.size)
    out = output_dir(Path(args.out), "--out")
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
    load = load_manifest(manifest, max_inputs=spec.max_inputs)
    if load.skipped:
        console.print(f"[yellow]{summarize_skips(load)}")
    worker = RolloutWorker(checkpoint=args.checkpoint)

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


def cmd_model_make_tiny(args: argparse.Namespace) -> int:
    """A tiny random-weight diffusers pipeline of a real architecture, written to --out (nothing is downloaded)."""
    from posterrl.models.tiny_pipelines import BUILDERS, check_out_dir, make_tiny, parameter_counts

    check_out_dir(args.out, args.force)
    output_dir(args.out.parent, "--out", given=args.out)  # <out>.tmp is written beside it, then moved in
    out = make_tiny(args.kind, args.out, seed=args.seed, force=args.force)
    counts = parameter_counts(out)
    console.print(f"wrote {BUILDERS[args.kind][0]} ({args.kind}, seed {args.seed}) to {out}: "
                  + ", ".join(f"{name} {count:,}" for name, count in counts.items())
                  + f" parameters, {sum(counts.values()):,} in all")
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
    run.add_argument("--force-config", action="store_true",
                     help="with --resume: continue even though the config differs from the run's config.yaml")
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
        one.add_argument("--force-config", action="store_true")
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

    model = sub.add_parser("model", help="the released architectures (FLUX.1 Kontext, Qwen-Image-Edit)")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    tiny = model_commands.add_parser(
        "make-tiny", help="write a tiny diffusers pipeline of a released architecture with random weights, "
                          "built in code (nothing is downloaded); from_pretrained(OUT) loads it")
    tiny.add_argument("--kind", required=True, choices=list(PIPELINE_MODEL_KINDS))
    tiny.add_argument("--out", required=True, type=Path, help="the pipeline folder to write (new or empty)")
    tiny.add_argument("--seed", type=int, default=0, help="weights' seed: the same seed writes the same files")
    tiny.add_argument("--force", action="store_true", help="replace what a non-empty --out holds")
    tiny.set_defaults(func=cmd_model_make_tiny)
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
    train.add_argument("--force-config", action="store_true")
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
    add.add_argument("--api-key-env", help="vlm_judge openai: the environment variable (in the run's cluster) that "
                     "holds the server's API key; the key itself is never passed")
    add.add_argument("--optional", action="store_true", help="a restarted reward server may serve without this "
                     "scorer if it no longer loads (default: the server does not start without it)")
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


def _is_override(item: str) -> bool:
    return "=" in item and not item.startswith("-")


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """build_parser's namespace, with `key=value` overrides anywhere after the subcommand (before or after
    CONFIG and the options) for the commands that take them; anything else unknown is an error, as with
    parse_args (exit 2 with the usage)."""
    parser = parser or build_parser()
    args, extras = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        tokens = [args.config, *args.overrides, *extras]  # command-line order: argparse took the first ones
        positional = 1 + len(args.overrides)
        pick = 0
        if _is_override(tokens[0]) and not Path(tokens[0]).is_file():  # an override came before CONFIG
            pick = next((i for i, t in enumerate(tokens) if not t.startswith("-") and not _is_override(t)), 0)
        args.config = tokens[pick]
        if _is_override(args.config) and not Path(args.config).is_file():
            parser.error(f"{args.command}: expected CONFIG (a YAML file) besides the overrides {tokens}")
        args.overrides = [t for i, t in enumerate(tokens) if i != pick and (i < positional or _is_override(t))]
        extras = [t for i, t in enumerate(tokens) if i >= positional and i != pick and not _is_override(t)]
    if extras:
        hint = ("; key=value overrides go with run, sft, distill, rl, reward train and config only"
                if any(_is_override(e) for e in extras) else "")
        parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
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
        return exc.exit_code if isinstance(exc, UserError) else 2
    except Interrupted as exc:
        console.print(f"[yellow]interrupted:[/yellow] {exc}", highlight=False, soft_wrap=True)
        return Interrupted.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: stopped where it was, without a checkpoint
        console.print("[yellow]interrupted:[/yellow] stopped at once by a second Ctrl-C (no checkpoint)")
        return Interrupted.exit_code


if __name__ == "__main__":
    sys.exit(main())
