"""The `reward` stage: preference pairs from the run's policy, a Bradley-Terry reward model trained on the
learner group, its held-out pairwise accuracy, and the reward server that serves it for the rest of the run."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from actors.context import PipelineContext
from actors.evaluation import latest_policy_dir
from actors.rollout_group import output_size
from posterrl.config import ConfigError
from posterrl.data.manifest import ManifestRow
from posterrl.models.reward_model import MODEL_SPEC_FILE, reward_model_spec
from posterrl.models.samples import PreferencePair
from posterrl.policies import load_policy
from reward_server.pairs import pairs_from_groups, pairwise_accuracy
from reward_server.preference_manifest import load_preference_manifest

PAIR_SEED_OFFSET = 7919  # pairs are sampled with other noise than evaluation, so they are not its samples


def sample_pairs(ctx: PipelineContext, rows: list[ManifestRow], noise: float, label: str,
                 seed: int) -> list[PreferencePair]:
    """K samples per prompt from the rollout actors, ranked by the (noisy) gold metric into pairs."""
    bt = ctx.config.reward_model
    chunks = ctx.rollout_group().submit(rows, group_size=bt.samples_per_prompt, base_seed=seed)
    ctx.wait_with_progress([c.ref for c in chunks],
                           f"reward: sampling {label} ({len(rows)} prompts x {bt.samples_per_prompt})")
    groups = ctx.rollout_group().gather(chunks, f"reward: sampling {label}", ctx.faults)
    outputs = [(row, group.output_images(size=output_size(row, group)))
               for row, group in zip(rows, groups, strict=True)]
    return pairs_from_groups(outputs, noise=noise, tie_threshold=bt.tie_threshold if noise else 0.0,
                             negative_pairs=bt.negative_pairs, seed=seed)


def held_out_accuracy(ctx: PipelineContext, pairs: list[PreferencePair]) -> dict[str, float]:
    chosen, rejected = ctx.learner_group().rank0("pair_scores", pairs)
    return pairwise_accuracy(np.asarray(chosen), np.asarray(rejected), pairs)


def run_reward(ctx: PipelineContext) -> dict[str, Any]:
    cfg, bt = ctx.config, ctx.config.reward_model
    export_dir = ctx.run.stage_checkpoint("reward")
    policy_dir = latest_policy_dir(ctx.run)
    if policy_dir is None:
        raise ConfigError(f"reward: {ctx.run.root} has no exported policy to sample preference pairs from "
                          "(run the distill stage first)")
    tasks = list(cfg.data.tasks)
    # Preference prompts: the training prompts plus the reward-only posters (data.n_reward).
    train_rows = [r for split in ("train", "reward") for r in ctx.rows.get(split, []) if r.task in tasks]
    val_rows = [r for r in ctx.rows["val"] if r.task in tasks]

    began = time.perf_counter()
    ctx.rollout_group().load_weights(load_policy(policy_dir).policy_state(), ctx.global_step,
                                     ctx.faults)
    seed = cfg.rollout.seed + PAIR_SEED_OFFSET
    train_pairs = sample_pairs(ctx, train_rows, bt.annotator_noise, "train prompts", seed)
    # Held-out pairs are ranked by the true gold metric: accuracy is measured against it, not the annotators.
    val_pairs = sample_pairs(ctx, val_rows, 0.0, "held-out prompts", seed)
    figures: dict[str, Any] = {"policy": str(policy_dir), "annotator_noise": bt.annotator_noise,
                               "sampling_s": round(time.perf_counter() - began, 1)}
    if bt.preference_manifest:
        user_pairs, skipped, reasons = load_preference_manifest(bt.preference_manifest)
        if skipped:
            ctx.console.print(f"[yellow]reward: skipped {skipped} rows of {bt.preference_manifest}: "
                              + "; ".join(reasons[:5]))
        train_pairs += user_pairs
        figures["manifest_pairs"], figures["manifest_skipped"] = len(user_pairs), skipped
    if bt.ties == "skip":
        train_pairs = [p for p in train_pairs if not p.tie]
    counts = {source: sum(p.source == source for p in train_pairs) for source in ("policy", "negative", "manifest")}
    figures["train_pairs"], figures["held_out_pairs"] = counts, len(val_pairs)
    ctx.console.print(f"reward: {len(train_pairs)} training pairs {counts}, {len(val_pairs)} held-out pairs")
    if len(train_pairs) < bt.batch_size:
        raise ConfigError(f"reward: only {len(train_pairs)} training pairs for reward_model.batch_size={bt.batch_size}")

    learners = ctx.learner_group()
    spec = reward_model_spec(bt)
    trainable = learners.start("reward_model", cfg.learner.seed, spec=spec, pairs=train_pairs)
    figures["trainable_parameters"] = trainable
    rng = np.random.default_rng(cfg.learner.seed)
    order, cursor = rng.permutation(len(train_pairs)), 0
    base_step, history = ctx.global_step, []
    with ctx.progress() as progress:
        bar = progress.add_task("reward: Bradley-Terry", total=bt.steps, info="")
        for step in range(bt.steps):
            if cursor + bt.batch_size > len(order):
                order, cursor = rng.permutation(len(train_pairs)), 0
            indices = order[cursor : cursor + bt.batch_size].tolist()
            cursor += bt.batch_size
            stats = learners.train_step(indices)
            ctx.global_step = base_step + step + 1
            ctx.scalars({"learner/bt/loss": stats.loss, "learner/bt/grad_norm": stats.grad_norm,
                         **{f"learner/bt/{k}": v for k, v in stats.extra.items()}})
            info = f"loss {stats.loss:.3f}"
            if (step + 1) % bt.eval_every == 0 or step + 1 == bt.steps:
                accuracy = held_out_accuracy(ctx, val_pairs)
                ctx.scalars({f"eval/bt/{k}": v for k, v in accuracy.items()})
                history.append({"step": step + 1, **accuracy})
                info += f"  held-out acc {accuracy['pairwise_accuracy']:.3f}"
            progress.update(bar, completed=step + 1, info=info)
            if step + 1 < bt.steps:
                ctx.stop_point(f"reward step {step + 1} (this stage keeps no checkpoint: --resume starts it over)")
    learners.call("export", str(export_dir))
    if not (export_dir / MODEL_SPEC_FILE).is_file():
        raise RuntimeError(f"reward: the learner did not export a reward model to {export_dir}")
    figures.update(held_out=history[-1], history=history, steps=bt.steps, export=str(export_dir))
    ctx.console.print("reward: held-out pairwise accuracy against the gold metric "
                      + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items() if k != "step"))
    ctx.reward_server(reload=True)
    return figures
