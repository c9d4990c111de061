"""Learner throughput, measured side by side in one run.

Prints samples/s of:
  - a bare PyTorch loop (policy + AdamW + grad clipping, one process, `--threads` threads),
  - the learner through Ray + DeepSpeed at world size 1 (one actor holding `--threads` CPUs),
  - the learner at world size 2 (two actors, half the threads each),
on the same model, global batch and data; then the ratio DeepSpeed/bare (target >= 0.85) and the
1 -> 2 rank scaling. On a 2-core machine 2 ranks share the same cores, so scaling shows overhead,
not speed-up.

    python benchmarks/bench_learner.py [--steps 12] [--batch 8] [--threads 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch

from actors.cluster import new_run_token
from actors.learner_group import LearnerGroup
from learner.data import BatchPlan
from learner.flow import draw_flow_inputs
from learner.losses import flow_matching_loss
from posterrl.batch import collate
from posterrl.config import load_config
from posterrl.data.manifest import load_manifest
from posterrl.data.tasks import generate_dataset
from posterrl.policy import EditPolicy


def bare_loop(config, plan: BatchPlan, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    policy = EditPolicy.from_config(config.model).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.sft.lr)

    def step(index: int) -> None:
        batch = collate(plan.batch(index), config.model.resolution,
                        stretch_rescaled=config.model.stretch_rescaled_input)
        x_t, t, eps = draw_flow_inputs(batch.targets, torch.Generator().manual_seed(index))
        ids, mask = policy.tokenize(batch.instructions)
        loss, _ = flow_matching_loss(policy(x_t, t, ids, mask, batch.inputs), batch.targets, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.learner.grad_clip)
        optimizer.step()

    step(0)  # warm-up
    start = time.perf_counter()
    for index in range(1, steps + 1):
        step(index)
    return steps * config.sft.batch_size / (time.perf_counter() - start)


def learner_group(config, plan: BatchPlan, steps: int) -> float:
    group = LearnerGroup(config)
    try:
        group.start("sft", seed=0)
        group.train_step(plan.batch(0))  # warm-up
        start = time.perf_counter()
        for index in range(1, steps + 1):
            group.train_step(plan.batch(index))
        return steps * config.sft.batch_size / (time.perf_counter() - start)
    finally:
        group.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    def config_for(ranks: int):
        return load_config(args.config, [*args.overrides, f"learner.num_ranks={ranks}",
                                         f"sft.batch_size={args.batch}",
                                         f"learner.micro_batch_size={args.batch // ranks}",
                                         f"learner.cpus_per_rank={args.threads / ranks}", "learner.warmup_steps=0",
                                         "rollout.num_actors=1", "rollout.cpus_per_actor=0",
                                         f"cluster.num_cpus={args.threads + 1}"])

    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_dataset(tmp, n=4, seed=0, size=64, tasks=("filling",), progress=False)
        rows = load_manifest(manifest, require_target=True).rows
        plan = BatchPlan(rows, args.batch, seed=0)
        new_run_token(tmp)  # token auth with a token of its own, as a run's cluster
        ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
        try:
            one = learner_group(config_for(1), plan, args.steps)
            two = learner_group(config_for(2), plan, args.steps)
        finally:
            ray.shutdown()
        bare = bare_loop(config_for(1), plan, args.steps, args.threads)

    print(f"learner benchmark: batch {args.batch}, {args.steps} timed steps, {args.threads} threads in all, "
          f"filling task (1 input image)")
    print(f"{'setup':<52}{'samples/s':>10}")
    print(f"{'bare PyTorch loop (1 process)':<52}{bare:>10.2f}")
    print(f"{'Ray + DeepSpeed ZeRO-2, 1 rank':<52}{one:>10.2f}")
    print(f"{'Ray + DeepSpeed ZeRO-2, 2 ranks (same cores)':<52}{two:>10.2f}")
    ratio = one / bare
    print(f"DeepSpeed(1 rank) / bare: {ratio:.2f}  (target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})")
    print(f"scaling 1 -> 2 ranks: {two / one:.2f}x")


if __name__ == "__main__":
    main()
