"""What buys held-out gold on the tiny default: one supervised expert trained in a bare PyTorch loop per setting,
then sampled on held-out posters and scored with the gold metric, beside the unedited input.

Each run prints one row: the setting, CPU-minutes (train + sample), held-out gold per task, their mean, and the
known-region PSNR (filling: outside the hole, extending: inside the visible crop) against the input. The rows of
docs/ablation.md come from this script.

    python benchmarks/ablate_tiny.py --regime local --steps 600 [model.key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from learner.flow import mix
from learner.losses import flow_matching_loss
from posterrl.batch import bucket_by_num_inputs, collate
from posterrl.config import load_config
from posterrl.data.gold import gold_metric, known_region_psnr
from posterrl.data.manifest import load_manifest
from posterrl.data.tasks import REGIME, TASKS, generate_dataset
from posterrl.flow import SamplerConfig
from posterrl.images import labelled_grid, uncanvas, uncanvas_detailed
from posterrl.policies import build_policy
from rollout.sampler import group_noise, prompt_seed, sample


def batches(rows, batch_size: int, seed: int):
    """Endless random batches of rows with one number of inputs (a bucket drawn in proportion to its size)."""
    by_n = defaultdict(list)
    for row in rows:
        by_n[len(row.inputs)].append(row)
    keys = sorted(by_n)
    weights = np.array([len(by_n[k]) for k in keys], float)
    rng = np.random.default_rng(seed)
    while True:
        k = keys[rng.choice(len(keys), p=weights / weights.sum())]
        pool = by_n[k]
        yield [pool[i] for i in rng.choice(len(pool), size=min(batch_size, len(pool)), replace=False)]


def timesteps(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":  # SD3's logit-normal(0, 1)
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--regime", choices=["local", "global", "all"], default="local",
                        help="all: one model on the six tasks, as the distilled student")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--decay", choices=["constant", "cosine"], default="constant", help="lr after warmup")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--timesteps", choices=["uniform", "logit_normal"], default="uniform")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the sampled weights (0: none)")
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[8], help="evaluate with each")
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--eval-at", type=int, nargs="*", default=[],
                        help="also evaluate after these steps (a learning curve from one run; constant lr)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--residual", action="store_true", help="model.residual=true")
    parser.add_argument("--loss-weight", choices=["policy", "none"], default="policy",
                        help="policy: Policy.loss_weight as the pipeline (t^2 where x0 is predicted); none: 1")
    parser.add_argument("--identity", action="store_true",
                        help="the copy test: every target is the first input (scored as PSNR against it)")
    parser.add_argument("--grid", default=None, help="write input / output / target of 3 rows per task to this PNG")
    parser.add_argument("--ceiling", action="store_true",
                        help="only score the held-out targets and first inputs passed through the canvas, every task")
    parser.add_argument("--label", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config, [*args.overrides, *(["model.residual=true"] if args.residual else [])])
    tasks = [t for t in TASKS if args.regime in ("all", REGIME[t])]
    resolution = config.model.resolution
    if args.ceiling:
        print_ceiling(config, args.n_val)
        return

    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        train = load_manifest(generate_dataset(Path(tmp) / "train", args.n_train, seed=config.data.seed,
                                               size=config.data.size, tasks=tasks, progress=False),
                              require_target=True).rows
        val = load_manifest(generate_dataset(Path(tmp) / "val", args.n_val, seed=config.data.seed, split="val",
                                             start=1_000_000, size=config.data.size, tasks=tasks, progress=False),
                            require_target=True).rows
        data_s = time.perf_counter() - began
        # Every row's tensors once: training spends its time in the model, not in PNG decoding.
        cache = {}
        for bucket in bucket_by_num_inputs(train, 64):
            b = collate(bucket, resolution, stretch_rescaled=config.model.stretch_rescaled_input)
            for i, row in enumerate(bucket):
                cache[row.id] = (b.instructions[i], b.inputs[i], b.inputs[i, 0] if args.identity else b.targets[i])

        policy = build_policy(config.model, config.rollout).train()
        ema = copy.deepcopy(policy).eval() if args.ema > 0 else None
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)

        def lr_factor(step: int) -> float:
            warm = min(1.0, (step + 1) / max(1, args.warmup))
            if args.decay == "cosine":
                return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
            return warm

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        generator = torch.Generator().manual_seed(0)
        draw = batches(train, args.batch, seed=0)
        began = time.perf_counter()
        losses, gnorms, eval_s = [], [], 0.0
        for step in range(args.steps):
            if step in args.eval_at:
                paused = time.perf_counter()
                print(f"  after {step} steps ({paused - began - eval_s:.0f} s of training)")
                for steps in args.sample_steps:
                    sampler = SamplerConfig(args.solver, steps, config.rollout.shift)
                    report(evaluate((ema or policy).eval(), val, resolution, sampler, args.identity, None), tasks,
                           sampler, args.identity)
                policy.train()
                eval_s += time.perf_counter() - paused
            rows = next(draw)
            instructions = [cache[r.id][0] for r in rows]
            inputs = torch.stack([cache[r.id][1] for r in rows])
            x0 = policy.encode_images(torch.stack([cache[r.id][2] for r in rows]), inputs)
            t = timesteps(args.timesteps, len(rows), generator)
            eps = torch.randn(x0.shape, generator=generator)
            x_t = mix(x0, t, eps)  # (B, 3, R, R)
            v = policy(x_t, t, *policy.prepare(instructions, inputs))  # (B, 3, R, R)
            weight = policy.loss_weight(t, inputs) if args.loss_weight == "policy" else None  # (B,)
            loss, _ = flow_matching_loss(v, x0, eps, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.clip)))
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if ema is not None:
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), policy.parameters(), strict=True):
                        pe.lerp_(p, 1 - args.ema)
        train_s = time.perf_counter() - began - eval_s

        model = (ema or policy).eval()
        print(f"ablation {args.label or ' '.join(args.overrides) or 'default'} | regime {args.regime} | "
              f"steps {args.steps} batch {args.batch} lr {args.lr} ({args.decay}) n_train {args.n_train} "
              f"t~{args.timesteps} ema {args.ema}")
        print(f"  data {data_s:.0f} s, train {train_s:.0f} s; loss first 50 {np.mean(losses[:50]):.3f}, "
              f"last 50 {np.mean(losses[-50:]):.3f}, grad norm median {np.median(gnorms):.2f}")
        for steps in args.sample_steps:
            sampler = SamplerConfig(args.solver, steps, config.rollout.shift)
            grid = args.grid.replace(".png", f"_{steps}.png") if args.grid else None
            report(evaluate(model, val, resolution, sampler, args.identity, grid), tasks, sampler, args.identity)


def print_ceiling(config, n_val: int) -> None:
    """What a perfect output on the canvas scores: the target, and the first input, through the canvas."""
    with tempfile.TemporaryDirectory() as tmp:
        val = load_manifest(generate_dataset(tmp, n_val, seed=config.data.seed, split="val", start=1_000_000,
                                             size=config.data.size, progress=False), require_target=True).rows
        scores = defaultdict(lambda: ([], []))
        for row in val:
            b = collate([row], config.model.resolution, stretch_rescaled=config.model.stretch_rescaled_input)
            target, first = row.load_target(), row.load_inputs()[0]
            through = uncanvas(b.targets[0], b.output_aspects[0], target.size)
            first_through = uncanvas(b.inputs[0, 0], (first.width, first.height), target.size)
            scores[row.task][0].append(gold_metric(row.task, through, target, row.meta))
            scores[row.task][1].append(gold_metric(row.task, first_through, target, row.meta))
    print(f"canvas {config.model.resolution} px, {n_val} held-out posters")
    for task, (target_scores, input_scores) in scores.items():
        print(f"  {task:<16} target {np.mean(target_scores):.3f}  first input {np.mean(input_scores):.3f}")


def evaluate(model, val, resolution: int, sampler: SamplerConfig, identity: bool, grid: str | None) -> dict:
    """Held-out gold, the input's gold and known-region PSNR per task (identity: canvas PSNR against the input)."""
    began = time.perf_counter()
    gold, base, psnr = defaultdict(list), defaultdict(list), defaultdict(list)
    sheet_rows, sheet_labels = [], []
    for bucket in bucket_by_num_inputs(val, 16):
        b = collate(bucket, resolution, stretch_rescaled=model.spec.stretch_rescaled_input)
        cond = model.condition(*model.prepare(b.instructions, b.inputs))
        noise = group_noise([prompt_seed(0, i) for i in b.ids], 1, model.latent_shape)
        images = model.decode_latents(sample(model, cond, noise, sampler), b.inputs)
        if identity:
            mse = (images - b.inputs[:, 0]).pow(2).flatten(1).mean(1) / 4  # on [0, 1]
            for row, m in zip(bucket, mse.tolist(), strict=True):
                psnr[row.task].append(10 * math.log10(1 / max(m, 1e-10)))
            continue
        for i, (row, image, aspect) in enumerate(zip(bucket, images, b.output_aspects, strict=True)):
            target = row.load_target()
            frame_input = b.frame_inputs[i] if model.spec.input_detail else None
            out = (uncanvas(image, aspect, target.size) if frame_input is None
                   else uncanvas_detailed(image, b.inputs[i, 0], frame_input, target.size))
            first = row.load_inputs()[0].resize(target.size)
            gold[row.task].append(gold_metric(row.task, out, target, row.meta))
            base[row.task].append(gold_metric(row.task, first, target, row.meta))
            p = known_region_psnr(row.task, out, first, row.meta)
            if p is not None:
                psnr[row.task].append(p)
            if len(gold[row.task]) <= 3:
                sheet_rows.append([*row.load_inputs(), out, target])
                sheet_labels.append([*(f"input {i}" for i in range(len(row.inputs))),
                                     f"out {gold[row.task][-1]:.2f}", "target"])
    if grid:
        labelled_grid(sheet_rows, sheet_labels).save(grid)
    return {"gold": gold, "base": base, "psnr": psnr, "seconds": time.perf_counter() - began}


def report(result: dict, tasks: list[str], sampler: SamplerConfig, identity: bool) -> None:
    gold, base, psnr = result["gold"], result["base"], result["psnr"]
    print(f"  sampler {sampler.solver} x {sampler.num_steps} ({result['seconds']:.0f} s)")
    if identity:
        print("    copy test: held-out canvas PSNR against the input "
              + ", ".join(f"{t} {np.mean(psnr[t]):.1f} dB" for t in tasks))
        return
    g = {t: float(np.mean(gold[t])) for t in tasks}
    for t in tasks:
        extra = f"  known-region PSNR {np.mean(psnr[t]):.1f} dB" if psnr[t] else ""
        print(f"    {t:<16} gold {g[t]:.3f}  (input {np.mean(base[t]):.3f}){extra}")
    print(f"    mean gold {np.mean(list(g.values())):.3f}  (input {np.mean([np.mean(base[t]) for t in tasks]):.3f})")

if __name__ == "__main__":
    main()
