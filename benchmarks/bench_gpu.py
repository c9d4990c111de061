"""The tiny FLUX.1 Kontext policy on a GPU (or the CPU), measured side by side in one run.

1. Rollout images/s: a RolloutWorker on the device sampling K samples for each of P prompts (Euler, --steps) at
   a --resolution px canvas, LoRA adapters loaded from numpy arrays as the object store hands them out.
2. NFT step time: one micro batch through the rl stage's own loss (learner/tasks/nft.py NftTask.micro_loss: VAE
   encoding of the inputs, v_theta, v_old through theta's layers, the NFT loss), backward and AdamW on the
   adapters, in plain torch (no DeepSpeed); bf16 on a GPU, fp32 on the CPU.
3. Weight sync: RolloutActorGroup.load_weights of the LoRA state through the object store on a local Ray cluster,
   to 1 and 4 rollout actors (on a GPU each actor gets gpus_per_actor=0.25, so 4 share one GPU), publish until
   every actor has loaded and its fingerprint is checked.
4. Peak GPU memory (torch.cuda.max_memory_allocated) of parts 1 and 2 in this process, and of each rollout actor.

    python benchmarks/bench_gpu.py [--device cuda|cpu] [--resolution R] [--steps S] [--prompts P] [--group-size K]
                                   [--micro-batch B] [--repeats N] [--actors 1,4] [--checkpoint DIR]

The checkpoint is a `posterrl model make-tiny --kind flux_kontext` folder (made in a temp folder when not given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch

from actors.cluster import new_run_token
from actors.faults import FaultLog
from actors.rollout_group import RolloutActorGroup
from learner.tasks import NftTask
from posterrl.config import Config, load_config
from posterrl.data.manifest import load_manifest, write_manifest
from posterrl.data.tasks import build_samples, write_samples
from posterrl.experience import RlSample
from posterrl.flow import SamplerConfig
from posterrl.models import tiny_pipelines
from posterrl.policy import quiet_model_libraries
from rollout.worker import RolloutWorker

REPO = Path(__file__).resolve().parents[1]
TASKS = ("filling", "extending", "layout-driven", "style-driven")
MiB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall seconds of `repeats` calls after one warm-up call, the device drained around each."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_config(checkpoint: Path, args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    overrides = [f"model.pretrained_path={checkpoint}", f"model.resolution={args.resolution}",
                 f"model.lora.rank={args.lora_rank}", f"model.lora.alpha={args.lora_rank}",
                 f"rollout.num_steps={args.steps}", f"rollout.group_size={args.group_size}",
                 f"learner.micro_batch_size={args.micro_batch}", "learner.num_ranks=1",
                 f"deepspeed.precision={'bf16' if args.device == 'cuda' else 'fp32'}", *(extra or [])]
    return load_config(REPO / "configs" / "flux_kontext_tiny.yaml", overrides)


def trained_adapters(config: Config) -> dict[str, np.ndarray]:
    """A LoRA policy state with every adapter moved (B starts at 0), as float32 numpy: what learner rank 0 puts
    into the object store (NftTask.sampling_weights)."""
    from posterrl.policies import build_policy

    state = build_policy(config.model).policy_state()
    generator = torch.Generator().manual_seed(1)
    return {k: (v.detach() + 0.1 * torch.randn(v.shape, generator=generator)).numpy() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------- 1. rollout


def bench_rollout(config: Config, weights: dict[str, np.ndarray], rows, args: argparse.Namespace,
                  device: torch.device, dtype: str = "fp32") -> dict:
    worker = RolloutWorker(model=config.model.model_dump(mode="json"), device=args.device, num_threads=args.threads,
                           dtype=dtype)
    worker.load_weights(weights, version=1)
    sampler = SamplerConfig.from_rollout(config.rollout)
    reset_peak(device)
    seconds = median_seconds(lambda: worker.sample(rows, args.group_size, 0, sampler, max_batch=args.max_batch),
                             args.repeats, device)
    images = len(rows) * args.group_size
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "peak_mib": peak_mib(device),
            "dtype": str(next(worker.policy.parameters()).dtype).removeprefix("torch.")}


# ---------------------------------------------------------------------------------------------------- 2. NFT step


class PlainEngine:
    """What NftTask.micro_loss asks of a DeepSpeed engine (a call and `.module`), as plain torch."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)


def bench_nft_step(config: Config, weights: dict[str, np.ndarray], args: argparse.Namespace,
                   device: torch.device) -> dict:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    task = NftTask(config, device, seed=0, init_state={k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    policy = task.build().to(device, dtype).train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    latent_shape = policy.latent_shape
    generator = torch.Generator().manual_seed(0)
    r = args.resolution
    chunk = [RlSample(f"p{i}", TASKS[i % len(TASKS)], f"Edit poster {i % 2}",
                      torch.rand(1, 3, r, r, generator=generator) * 2 - 1,
                      torch.randn(latent_shape, generator=generator), (i % 4) / 3)
             for i in range(args.micro_batch)]
    step_generator = torch.Generator()
    losses: list[float] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.micro_loss(PlainEngine(policy), chunk, step_generator.manual_seed(len(losses)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.learner.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))

    reset_peak(device)
    seconds = median_seconds(step, args.repeats, device)
    return {"seconds": seconds, "samples_per_s": args.micro_batch / seconds, "peak_mib": peak_mib(device),
            "dtype": str(dtype).removeprefix("torch."), "trainable": sum(p.numel() for p in trainable),
            "parameters": sum(p.numel() for p in policy.parameters()), "loss_finite": all(map(np.isfinite, losses))}


# ---------------------------------------------------------------------------------------------------- 3. weight sync


def actor_peak_mib(worker) -> float:  # runs inside a rollout actor (shipped by value)
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")


def bench_weight_sync(checkpoint: Path, weights: dict[str, np.ndarray], actors: int, args: argparse.Namespace) -> dict:
    gpu = args.device == "cuda"
    config = bench_config(checkpoint, args, [f"rollout.num_actors={actors}", "rollout.cpus_per_actor=0.25",
                                             f"rollout.gpus_per_actor={0.25 if gpu else 0}"])
    began = time.perf_counter()
    group = RolloutActorGroup(config)
    try:
        group.load_weights(weights, 0, FaultLog())  # every actor up, its policy built and loaded once
        startup = time.perf_counter() - began
        times = []
        for version in range(1, args.repeats + 1):
            began = time.perf_counter()
            group.load_weights(weights, version, FaultLog())  # ray.put, every actor loads, fingerprints checked
            times.append(time.perf_counter() - began)
        peaks = ray.get([a.__ray_call__.remote(actor_peak_mib) for a in group.actors], timeout=120) if gpu else []
    finally:
        group.shutdown()
    return {"seconds": statistics.median(times), "startup_s": startup, "actor_peak_mib": max(peaks, default=None)}


# ---------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--resolution", type=int, help="canvas px, a multiple of 16 (default 256 on cuda, 32 on cpu)")
    parser.add_argument("--steps", type=int, default=8, help="Euler steps per rollout")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4, help="K samples per prompt")
    parser.add_argument("--max-batch", type=int, default=16, help="samples per sampler call (RolloutWorker.sample)")
    parser.add_argument("--micro-batch", type=int, default=4, help="rl samples per NFT step")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--actors", default="1,4", help="rollout actor counts for the weight sync")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (cpu)")
    parser.add_argument("--checkpoint", type=Path, help="a make-tiny flux_kontext folder (default: made in a temp dir)")
    args = parser.parse_args()
    if args.resolution is None:
        args.resolution = 256 if args.device == "cuda" else 32
    if args.resolution % 16:
        parser.error(f"--resolution {args.resolution}: expected a multiple of 16 (8x VAE, 2 x 2 packing)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here (use --device cpu)")
    return args


def main() -> None:
    args = parse_args()
    quiet_model_libraries()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    actor_counts = [int(a) for a in args.actors.split(",")]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = args.checkpoint or tiny_pipelines.make_tiny("flux_kontext", tmp / "flux_kontext", seed=0)
        config = bench_config(checkpoint, args)
        weights = trained_adapters(config)
        written = []
        for index in range(args.prompts):  # one prompt per poster, the tasks in turn
            written += write_samples(build_samples(index, seed=0, size=64, tasks=(TASKS[index % len(TASKS)],)), tmp)
        write_manifest(written, tmp / "manifest.jsonl")
        rows = load_manifest(tmp / "manifest.jsonl").rows

        rollout = bench_rollout(config, weights, rows, args, device)
        rollout_bf16 = bench_rollout(config, weights, rows, args, device, dtype="bf16")  # rollout.dtype: bf16
        nft = bench_nft_step(config, weights, args, device)
        new_run_token(tmp)  # token auth with a token of its own, as a run's cluster
        ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=torch.cuda.device_count() if args.device == "cuda"
                 else 0, include_dashboard=False, log_to_driver=False)
        try:
            sync = {m: bench_weight_sync(checkpoint, weights, m, args) for m in actor_counts}
        finally:
            ray.shutdown()
    total = time.perf_counter() - began

    where = (f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
             if args.device == "cuda" else f"CPU, {args.threads} torch threads (torch {torch.__version__})")
    state_bytes = sum(v.nbytes for v in weights.values())
    print(f"tiny FLUX.1 Kontext on {where}: {nft['parameters']:,} parameters, LoRA rank {args.lora_rank} "
          f"({nft['trainable']:,} trained, {state_bytes:,} bytes synced), canvas {args.resolution} px "
          f"({(args.resolution // 16) ** 2} latent tokens), medians of {args.repeats}")

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows_out = [
        (f"rollout images/s ({args.prompts} prompts x K={args.group_size}, {args.steps} steps, {rollout['dtype']})",
         f"{rollout['images_per_s']:.2f}", mib(rollout["peak_mib"])),
        (f"NFT step ms (micro batch {args.micro_batch}, fwd+bwd+AdamW, {nft['dtype']})", f"{nft['seconds'] * 1e3:.1f}",
         mib(nft["peak_mib"])),
        ("rollout images/s, rollout.dtype bf16", f"{rollout_bf16['images_per_s']:.2f}", mib(rollout_bf16["peak_mib"])),
        ("rollout bf16 / float32 images/s", f"{rollout_bf16['images_per_s'] / rollout['images_per_s']:.2f}", ""),
        ("NFT samples/s", f"{nft['samples_per_s']:.2f}", ""),
    ]
    for m, s in sync.items():
        label = f"weight sync ms, object store -> {m} actor{'s' if m > 1 else ''}"
        rows_out.append((label, f"{s['seconds'] * 1e3:.1f}", mib(s["actor_peak_mib"])))
    if len(actor_counts) > 1:
        first, last = sync[actor_counts[0]]["seconds"], sync[actor_counts[-1]]["seconds"]
        rows_out.append((f"weight sync {actor_counts[-1]} / {actor_counts[0]} actors", f"{last / first:.2f}", ""))
    print(f"{'measure':<64}{'value':>10}{'peak MiB':>10}")
    for label, value, peak in rows_out:
        print(f"{label:<64}{value:>10}{peak:>10}")
    startups = ", ".join(f"{s['startup_s']:.1f}" for s in sync.values())
    print(f"(actor groups of {args.actors} started and loaded in {startups} s; whole benchmark {total:.0f} s)")
    report = {"device": args.device, "where": where, "resolution": args.resolution, "steps": args.steps,
              "rollout": rollout, "rollout_bf16": rollout_bf16,
              "nft_step": nft, "weight_sync": {str(m): s for m, s in sync.items()},
              "seconds": total}
    print(json.dumps(report))
    if not nft["loss_finite"]:
        sys.exit("the NFT loss was not finite")


if __name__ == "__main__":
    main()
