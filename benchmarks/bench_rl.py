"""The rl stage's moving parts, measured side by side in one run.

1. Weight sync from learner rank 0 to 1, 2 and 4 rollout actors (medians of --repeats publishes,
   request to every actor loaded), for the tiny policy and a policy of about 50M parameters; the
   object store (CPU default) and the gloo broadcast group (the code path NCCL takes on GPUs).
   Target: 4 actors within 1.5x of one.
2. Rollout images/s of one rollout actor (through Ray: submit, sample, return) against the bare
   sampler in-process on the same model and thread count. Target: at least 0.9.
3. rl epoch time in sync versus one-step-off-policy mode, on the tiny default's rl sizes.

    python benchmarks/bench_rl.py [--repeats 5] [--epochs 6] [--skip-big] [--parts 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
from rich.console import Console

from actors.cluster import new_run_token
from actors.faults import FaultLog
from actors.learner_group import LearnerGroup
from actors.pipeline import run_pipeline
from actors.rollout_group import RolloutActorGroup
from actors.weight_sync import WeightSync
from posterrl.config import load_config
from posterrl.data.manifest import load_manifest
from posterrl.data.tasks import TASKS, generate_dataset
from posterrl.flow import SamplerConfig
from posterrl.policy import EditPolicy
from rollout.worker import RolloutWorker

BIG = ["model.transformer.num_layers=3", "model.transformer.num_single_layers=5",
       "model.transformer.attention_head_dim=64", "model.transformer.num_attention_heads=8",
       "model.transformer.axes_dims_rope=[16,24,24]", "model.text_encoder.d_model=256", "model.text_encoder.d_ff=512"]


def sync_times(model_overrides: list[str], actors: int, method: str, repeats: int) -> float:
    """Median seconds of a publish (theta_old requested from rank 0 until every actor has loaded it)."""
    config = load_config("configs/tiny.yaml", [*model_overrides, "learner.num_ranks=1", "learner.cpus_per_rank=0.1",
                                               f"rollout.num_actors={actors}", "rollout.cpus_per_actor=0.1",
                                               f"rollout.weight_sync={method}", "cluster.num_cpus=4"])
    learners, rollouts = LearnerGroup(config), RolloutActorGroup(config)
    try:
        learners.start("nft", 0, init_state=EditPolicy.from_config(config.model).state_dict())
        sync = WeightSync(learners, rollouts, method, FaultLog())
        sync.publish(0).wait()  # warm-up
        times = []
        for version in range(1, repeats + 1):
            began = time.perf_counter()
            sync.publish(version).wait()
            times.append(time.perf_counter() - began)
        return statistics.median(times)
    finally:
        learners.shutdown()
        rollouts.shutdown()


def rollout_throughput(rows, group_size: int, repeats: int) -> tuple[float, float]:
    """images/s of one rollout actor with 1 CPU (through Ray) and of the bare sampler with 1 thread."""
    config = load_config("configs/tiny.yaml", ["rollout.num_actors=1", "rollout.cpus_per_actor=1"])
    sampler = SamplerConfig(config.rollout.solver, config.rollout.num_steps, config.rollout.shift)
    policy_state = EditPolicy.from_config(config.model).state_dict()
    group = RolloutActorGroup(config)
    try:
        group.load_weights(policy_state, 0, FaultLog())
        group.gather(group.submit(rows, group_size, base_seed=0), "bench", FaultLog())  # warm-up
        actor_times = []
        for seed in range(1, repeats + 1):
            began = time.perf_counter()
            group.gather(group.submit(rows, group_size, base_seed=seed), "bench", FaultLog())
            actor_times.append(time.perf_counter() - began)
    finally:
        group.shutdown()
    worker = RolloutWorker(model=config.model.model_dump(mode="json"), num_threads=1)
    worker.load_weights(policy_state, version=0)
    worker.sample(rows, group_size, 0, sampler)
    bare_times = []
    for seed in range(1, repeats + 1):
        began = time.perf_counter()
        for start in range(0, len(rows), 4):  # the chunks the actor group deals out
            worker.sample(rows[start : start + 4], group_size, seed, sampler)
        bare_times.append(time.perf_counter() - began)
    images = len(rows) * group_size
    return images / statistics.median(actor_times), images / statistics.median(bare_times)


def epoch_times(tmp: Path, mode: str, epochs: int) -> tuple[float, float]:
    """Mean perf/epoch_s (first epoch left out) and the rl stage's wall seconds."""
    run = tmp / f"run_{mode}"
    overrides = ["stages=[data,rl]", "data.n_train=8", "data.n_val=2", "logging.progress=false",
                 "reward.scorers=[{name: keep, kind: preservation}]", f"rl.mode={mode}", f"rl.epochs={epochs}",
                 "rl.eval_every=1000", "rl.checkpoint_every=1000", "rl.log_images_every=1000", "rl.dump_every=1000"]
    config = load_config("configs/tiny.yaml", overrides)
    EditPolicy.from_config(config.model, config.rollout).save_pretrained(run / "checkpoints" / "distill")
    summary = run_pipeline(config, run, console=Console(quiet=True))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    per_epoch = [v.value for v in acc.Scalars("perf/epoch_s")][1:]
    return statistics.mean(per_epoch), summary["stages"]["rl"]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--skip-big", action="store_true", help="leave out the 50M-parameter policy")
    parser.add_argument("--parts", default="1,2,3", help="which measurements to run, e.g. 1 or 1,3")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = generate_dataset(tmp / "data", n=4, seed=0, size=64, progress=False)
        rows = load_manifest(manifest, require_target=True).rows  # 24 prompts, 4 of each task

        new_run_token(tmp)  # token auth with a token of its own, as a run's cluster
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            sizes = [("tiny (1.9M)", [])] + ([] if args.skip_big else [("big (51M)", BIG)])
            sync = {(name, method, m): sync_times(overrides, m, method, args.repeats)
                    for name, overrides in sizes for method in ("object_store", "broadcast") for m in (1, 2, 4)
                    if 1 in parts}
            throughput = rollout_throughput(rows, group_size=4, repeats=args.repeats) if 2 in parts else None
        finally:
            ray.shutdown()
        epochs = {mode: epoch_times(tmp, mode, args.epochs) for mode in ("sync", "off_policy") if 3 in parts}

    report: dict = {}
    if sync:
        print("1. weight sync, learner rank 0 -> rollout actors (median seconds per publish)")
        print(f"{'policy':<14}{'method':<14}{'1 actor':>10}{'2 actors':>10}{'4 actors':>10}{'4 / 1':>8}")
        report.update(weight_sync_s={}, target_4_over_1=1.5)
        for name, _ in sizes:
            for method in ("object_store", "broadcast"):
                t = [sync[(name, method, m)] for m in (1, 2, 4)]
                print(f"{name:<14}{method:<14}{t[0]:>10.4f}{t[1]:>10.4f}{t[2]:>10.4f}{t[2] / t[0]:>8.2f}")
                report["weight_sync_s"][f"{name} {method}"] = t
        print("   target: 4 actors within 1.5x of one")
    if throughput:
        actor_ips, bare_ips = throughput
        ratio = actor_ips / bare_ips
        print(f"2. rollout images/s: one actor {actor_ips:.2f}, bare sampler {bare_ips:.2f}, ratio {ratio:.2f} "
              f"(target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); 24 prompts ({len(TASKS)} tasks) x K=4")
        report.update(rollout_images_per_s={"actor": actor_ips, "bare": bare_ips, "ratio": ratio})
    if epochs:
        (sync_epoch, sync_total), (off_epoch, off_total) = epochs["sync"], epochs["off_policy"]
        print(f"3. rl epoch seconds (tiny default sizes, {args.epochs} epochs, first left out): sync {sync_epoch:.2f}, "
              f"off_policy {off_epoch:.2f} ({sync_epoch / off_epoch:.2f}x); stage wall {sync_total:.1f} s vs "
              f"{off_total:.1f} s")
        report.update(epoch_s={"sync": sync_epoch, "off_policy": off_epoch})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
