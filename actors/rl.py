"""The `rl` stage: DiffusionNFT on the policy's own rollouts, in the run's cluster.

One epoch: the rollout actors sample K edits per prompt with the sampling policy theta_old and hand
each finished chunk to the reward server (scoring overlaps sampling); the driver turns rewards into
optimality probabilities (per-prompt groups, global std); the learner group takes NFT steps on the
clean samples; theta_old is soft-updated and published to the rollout actors through the object
store. `rl.mode: off_policy` submits the next epoch's rollouts before training on this one, so
sampling and training overlap and rollouts are at most `rl.max_staleness` updates old.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.context import PipelineContext
from actors.evaluation import evaluate, latest_policy_dir
from actors.rollout_group import output_size
from actors.weight_sync import Publication, WeightSync
from learner.data import rl_batches, rl_prompts
from learner.engine import LATEST_FILE
from learner.nft import PromptRetirement, group_advantages, low_variance_groups, optimality_probability
from posterrl.batch import RlSample
from posterrl.config import ConfigError
from posterrl.data.manifest import ManifestRow
from posterrl.images import labelled_grid
from posterrl.policy import SPEC_FILE, EditPolicy
from reward_server.registry import RewardResult
from rollout.worker import RolloutGroup

ROLLOUT_SEED_OFFSET = 104_729  # rollout noise differs from evaluation's and the reward stage's


@dataclass
class EpochRollouts:
    """The scored rollouts of one epoch.

    groups[g] holds K samples of rows[g]; results[g][k] is the reward server's answer for sample k.
    """

    epoch: int
    rows: list[ManifestRow]
    groups: list[RolloutGroup]
    results: list[list[RewardResult]]
    rollout_s: float  # submission -> last chunk sampled
    reward_s: float  # last chunk sampled -> last reward in (what scoring adds beyond sampling)

    @property
    def images(self) -> int:
        return sum(g.samples.shape[0] for g in self.groups)

    @property
    def policy_version(self) -> int:
        return min(g.policy_version for g in self.groups)


@dataclass
class Pending:
    """Rollouts submitted to the actors, not yet collected."""

    epoch: int
    rows: list[ManifestRow]
    refs: list[ray.ObjectRef]
    submitted: float = field(default_factory=time.perf_counter)

    def collect(self) -> EpochRollouts:
        ray.wait(self.refs, num_returns=len(self.refs))
        sampled_at = time.perf_counter()
        chunks = ray.get(self.refs)  # in submission order: (groups, rewards ref)
        groups = [g for chunk_groups, _ in chunks for g in chunk_groups]
        flat = [r for rewards in ray.get([ref for _, ref in chunks]) for r in rewards]
        reward_s = time.perf_counter() - sampled_at
        results, start = [], 0
        for group in groups:
            k = group.samples.shape[0]
            results.append(flat[start : start + k])
            start += k
        return EpochRollouts(self.epoch, self.rows, groups, results, rollout_s=sampled_at - self.submitted,
                             reward_s=reward_s)


@dataclass
class ScoredEpoch:
    """What the learner trains on after one epoch's rewards are turned into optimality probabilities."""

    samples: list[RlSample]
    rewards: dict[str, np.ndarray]  # prompt id -> (K,) combined rewards (NaN where dropped)
    r: dict[str, np.ndarray]  # prompt id -> (K,) optimality probability (NaN where not trained)
    advantages: dict[str, np.ndarray]
    dropped_samples: int
    filtered_groups: list[str]
    stats: dict[str, float]


def score_epoch(rollouts: EpochRollouts, adv_max: float, min_group_std: float | None,
                advantage_std: str = "batch") -> ScoredEpoch:
    """Rewards -> advantages (group mean, global std) -> r; drops samples without a reward and filtered groups."""
    ids, values, where, tasks = [], [], [], []
    rewards: dict[str, np.ndarray] = {}
    dropped = 0
    for g, (group, results) in enumerate(zip(rollouts.groups, rollouts.results)):
        combined = np.array([np.nan if r.reward is None else r.reward for r in results])  # (K,)
        rewards[group.prompt_id] = combined
        valid = np.flatnonzero(np.isfinite(combined))
        dropped += len(combined) - len(valid)
        if len(valid) < 2:  # a group needs two scored samples to compare
            dropped += len(valid)
            continue
        for k in valid:
            ids.append(group.prompt_id)
            tasks.append(group.task)
            values.append(combined[k])
            where.append((g, int(k)))
    r_by_group = {gid: np.full_like(v, np.nan) for gid, v in rewards.items()}
    adv_by_group = {gid: np.full_like(v, np.nan) for gid, v in rewards.items()}
    if not values:
        return ScoredEpoch([], rewards, r_by_group, adv_by_group, dropped, [], {})
    values = np.asarray(values)
    advantages, stats = group_advantages(values, ids, std_keys=tasks if advantage_std == "task" else None)
    r = optimality_probability(advantages, adv_max)
    filtered = sorted(low_variance_groups(values, ids, min_group_std)) if min_group_std is not None else []
    samples = []
    for (g, k), gid, a, prob in zip(where, ids, advantages, r):
        adv_by_group[gid][k], r_by_group[gid][k] = a, prob
        if gid in filtered:
            continue
        group = rollouts.groups[g]
        samples.append(RlSample(gid, group.task, group.instruction, group.inputs, group.samples[k], float(prob)))
    stats["r_mean"] = float(np.mean([s.r for s in samples])) if samples else float("nan")
    return ScoredEpoch(samples, rewards, r_by_group, adv_by_group, dropped, filtered, stats)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


class RolloutLog:
    """TensorBoard scalars, grids, text and histograms of an epoch's rollouts, and the on-disk dumps."""

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self.dump_root = ctx.run.root / "rollouts"

    def scalars(self, rollouts: EpochRollouts, scored: ScoredEpoch) -> dict[str, float]:
        components: dict[str, list[float]] = defaultdict(list)
        per_task: dict[str, list[float]] = defaultdict(list)
        versions: dict[str, int] = {}
        for group, results in zip(rollouts.groups, rollouts.results):
            for result in results:
                for name, value in result.components.items():
                    components[name].append(value)
                for name, version in result.versions.items():
                    versions[name] = max(versions.get(name, 0), version)
                if result.reward is not None:
                    components["combined"].append(result.reward)
                    per_task[group.task].append(result.reward)
        values: dict[str, float] = {}
        for name, scores in components.items():
            values[f"reward/{name}/mean"] = float(np.mean(scores))
            values[f"reward/{name}/std"] = float(np.std(scores))
        for name, version in versions.items():
            values[f"reward/{name}/version"] = float(version)
        for task, scores in per_task.items():
            values[f"reward/task/{task}/mean"] = float(np.mean(scores))
        values["rl/r_mean"] = scored.stats.get("r_mean", float("nan"))
        values["rl/advantage_abs_mean"] = scored.stats.get("advantage_abs_mean", float("nan"))
        values["rl/filtered_groups"] = float(len(scored.filtered_groups))
        values["rl/dropped_samples"] = float(scored.dropped_samples)
        values["rl/policy_version"] = float(rollouts.policy_version)
        if self.ctx.writer is not None:
            for task, scores in per_task.items():
                self.ctx.writer.add_histogram(f"reward/task/{task}/hist", np.asarray(scores), self.ctx.global_step)
        return values

    def grids(self, rollouts: EpochRollouts, per_task: int) -> None:
        """Per task, `per_task` prompt groups: the inputs, then the K outputs sorted by reward, each labelled."""
        writer = self.ctx.writer
        if writer is None or per_task == 0:
            return
        shown: dict[str, int] = defaultdict(int)
        for row, group, results in zip(rollouts.rows, rollouts.groups, rollouts.results):
            if shown[group.task] >= per_task:
                continue
            index = shown[group.task]
            shown[group.task] += 1
            outputs = group.output_images()
            order = sorted(range(len(results)), key=lambda k: -np.inf if results[k].reward is None else -results[k].reward)
            inputs = row.load_inputs()
            cells = [*inputs, *(outputs[k] for k in order)]
            labels = [*(f"input {i}" for i in range(len(inputs))), *(self._label(results[k]) for k in order)]
            sheet = labelled_grid([cells], [labels], cell=112)
            tag = f"rollout/{group.task}/group{index}"
            writer.add_image(tag, np.asarray(sheet), self.ctx.global_step, dataformats="HWC")
            versions = ", ".join(f"{n} v{v}" for n, v in sorted(results[0].versions.items()))
            writer.add_text(tag, f"`{group.prompt_id}` (epoch {rollouts.epoch}, policy v{group.policy_version}, "
                                 f"rewards: {versions})\n\n{group.instruction}", self.ctx.global_step)

    @staticmethod
    def _label(result: RewardResult) -> str:
        head = "R dropped" if result.reward is None else f"R {result.reward:.3f}"
        parts = "\n".join(f"{name} {value:.3f}" for name, value in sorted(result.components.items()))
        return f"{head}\n{parts}"

    def dump(self, rollouts: EpochRollouts, scored: ScoredEpoch) -> Path:
        """Every sample as a PNG and a JSONL row under <run>/rollouts/epoch_NNNN/."""
        folder = self.dump_root / f"epoch_{rollouts.epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for row, group, results in zip(rollouts.rows, rollouts.groups, rollouts.results):
            images = group.output_images(size=output_size(row, group))  # exactly what was scored
            for k, (image, result) in enumerate(zip(images, results)):
                name = f"{safe_name(group.prompt_id)}_{k}.png"
                image.save(folder / name)
                r = scored.r[group.prompt_id][k]
                lines.append(json.dumps({
                    "epoch": rollouts.epoch, "prompt_id": group.prompt_id, "sample": k, "task": group.task,
                    "instruction": group.instruction, "image": name, "reward": result.reward,
                    "rewards": result.components, "weights": result.weights, "reward_versions": result.versions,
                    "failed": result.failed, "policy_version": group.policy_version,
                    "r": None if not np.isfinite(r) else float(r),
                    "filtered": group.prompt_id in scored.filtered_groups}))
        (folder / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
        return folder


def _train_rows(ctx: PipelineContext) -> list[ManifestRow]:
    return [r for r in ctx.rows["train"] if r.task in ctx.config.data.tasks]


def start_policy(ctx: PipelineContext) -> tuple[Path, dict]:
    """The policy RL starts from (and keeps as its KL reference): the run's distilled student."""
    source = ctx.run.stage_checkpoint("distill")
    if not (source / SPEC_FILE).is_file():
        newest = latest_policy_dir(ctx.run)
        if newest is None:
            raise ConfigError(f"rl: {ctx.run.root} has no exported policy to start from (run the distill stage first)")
        source = newest
    return source, EditPolicy.from_pretrained(source).state_dict()


def run_rl(ctx: PipelineContext) -> dict[str, Any]:
    cfg, rl = ctx.config, ctx.config.rl
    if not ctx.reward_available():
        raise ConfigError("rl: no reward server can start: reward.scorers is empty, or its bradley_terry scorer "
                          "serves the reward stage's model and that stage has not run (add 'reward' to stages)")
    source, init_state = start_policy(ctx)
    rows = _train_rows(ctx)
    learners, rollouts_group, server = ctx.learner_group(), ctx.rollout_group(), ctx.reward_server()
    learners.call("start_rl_stage", ray.put(init_state), rl.seed)
    checkpoint_dir = ctx.run.checkpoints / "deepspeed" / "rl"
    retirement = PromptRetirement(rl.retire_threshold, rl.retire_patience) if rl.retire_threshold is not None else None
    start_epoch, base_step, history = 0, ctx.global_step, []
    if ctx.resume and (checkpoint_dir / LATEST_FILE).is_file():
        state = learners.call("load_checkpoint", str(checkpoint_dir))[0]
        start_epoch, base_step, history = state["epoch"], state["base_step"], state["history"]
        if retirement is not None:
            retirement.load(state["retirement"])
        ctx.console.print(f"rl: resumed from {checkpoint_dir} at epoch {start_epoch}")
    learner_step = learners.call("current_step")[0]  # optimizer steps of the stage (after a resume: so far)
    ctx.global_step = base_step + learner_step
    log = RolloutLog(ctx)
    base_seed = cfg.rollout.seed + ROLLOUT_SEED_OFFSET

    def submit(epoch: int) -> Pending:
        prompts = rl_prompts(rows, rl.prompts_per_epoch, rl.seed, epoch,
                             retirement.retired if retirement is not None else frozenset())
        refs = rollouts_group.submit_scored(prompts, cfg.rollout.group_size, base_seed + epoch, server,
                                            ctx.global_step)
        return Pending(epoch, prompts, refs)

    sync = WeightSync(learners, rollouts_group, cfg.rollout.weight_sync)
    sync.publish(start_epoch).wait()
    unresolved: Publication | None = None  # off_policy: the last publish, resolved an epoch later
    in_flight: deque[Pending] = deque()
    ahead = rl.max_staleness if rl.mode == "off_policy" else 0
    figures: dict[str, Any] = {"start_policy": str(source), "mode": rl.mode, "epochs": rl.epochs}
    with ctx.progress() as progress:
        bar = progress.add_task("rl: DiffusionNFT", total=rl.epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch, rl.epochs):
            epoch_began = time.perf_counter()
            if not in_flight:
                in_flight.append(submit(epoch))
            rollouts = in_flight.popleft().collect()
            # off_policy: the next epochs' rollouts start now, on the weights the actors hold, while we train.
            while len(in_flight) < ahead and in_flight_end(in_flight, epoch) < rl.epochs:
                in_flight.append(submit(in_flight_end(in_flight, epoch)))
            scored = score_epoch(rollouts, rl.adv_max, rl.min_group_std, rl.advantage_std)
            train_began = time.perf_counter()
            steps_stats = []
            for pass_index in range(rl.passes):
                for batch in rl_batches(scored.samples, rl.batch_size, seed=[rl.seed, epoch, pass_index]):
                    steps_stats.append(learners.train_rl_step(batch))
            train_s = time.perf_counter() - train_began
            eta = learners.call("update_sampling_policy")[0]
            # sync: wait for the actors now; off_policy: they load after their queued rollouts, so the
            # previous publish is resolved here instead (perf/weight_sync_s lags one epoch).
            publication = sync.publish(epoch + 1)
            if rl.mode == "sync":
                sync_s = publication.wait()
            else:
                sync_s = unresolved.wait() if unresolved is not None else None
                unresolved = publication
            learner_step = steps_stats[-1].step if steps_stats else learner_step
            ctx.global_step = base_step + learner_step

            values = log.scalars(rollouts, scored)
            if steps_stats:
                values.update({"learner/loss": float(np.mean([s.loss for s in steps_stats])),
                               "learner/grad_norm": float(np.mean([s.grad_norm for s in steps_stats])),
                               **{f"learner/{k}": float(np.mean([s.extra[k] for s in steps_stats]))
                                  for k in steps_stats[0].extra if k != "r_mean"}})
            newly_retired = retirement.observe({gid: float(np.nanmean(v)) for gid, v in scored.rewards.items()
                                                if np.isfinite(v).any()}) if retirement is not None else []
            values.update({
                "rl/eta": eta, "rl/steps": float(len(steps_stats)), "rl/staleness": float(epoch - rollouts.policy_version),
                "rl/retired_prompts": float(len(retirement.retired)) if retirement is not None else 0.0,
                "perf/rollout_s": rollouts.rollout_s, "perf/reward_s": rollouts.reward_s, "perf/train_s": train_s,
                "perf/images_per_s": rollouts.images / max(rollouts.rollout_s, 1e-9),
                "perf/epoch_s": time.perf_counter() - epoch_began,
            })
            if sync_s is not None:
                values["perf/weight_sync_s"] = sync_s
            ctx.scalars(values)
            if (epoch + 1) % rl.log_images_every == 0 or epoch == start_epoch:
                log.grids(rollouts, rl.log_groups)
            if (epoch + 1) % rl.dump_every == 0 or epoch + 1 == rl.epochs:
                log.dump(rollouts, scored)
            record = {"epoch": epoch + 1, "step": ctx.global_step, "reward": values.get("reward/combined/mean"),
                      "policy_version": rollouts.policy_version}
            if (epoch + 1) % rl.eval_every == 0 and epoch + 1 < rl.epochs:
                progress.stop()
                evaluation = evaluate(ctx, None, f"rl epoch {epoch + 1}", version=epoch + 1)
                record.update(gold=evaluation.gold["mean"], eval_reward=evaluation.reward.get("mean"))
                progress.start()
            history.append(record)
            if (epoch + 1) % rl.checkpoint_every == 0 and epoch + 1 < rl.epochs:
                state = {"epoch": epoch + 1, "base_step": base_step, "history": history,
                         "retirement": retirement.state() if retirement is not None else None}
                learners.call("save_checkpoint", str(checkpoint_dir), state, cfg.learner.keep_checkpoints)
            info = (f"reward {values.get('reward/combined/mean', float('nan')):.3f}  "
                    f"|A| {values['rl/advantage_abs_mean']:.2f}  v{rollouts.policy_version}")
            if newly_retired:
                info += f"  retired {len(newly_retired)}"
            progress.update(bar, completed=epoch + 1, info=info)
        for pending in in_flight:  # off_policy: rollouts past the last epoch are not used
            ray.get(pending.refs)
    state = {"epoch": rl.epochs, "base_step": base_step, "history": history,
             "retirement": retirement.state() if retirement is not None else None}
    learners.call("save_checkpoint", str(checkpoint_dir), state, cfg.learner.keep_checkpoints)
    export_dir = ctx.run.stage_checkpoint("rl")
    learners.call("export", str(export_dir), True)
    figures.update(history=history, export=str(export_dir), steps=learner_step)
    return figures


def in_flight_end(in_flight: deque, epoch: int) -> int:
    """The next epoch to submit: one past the last one in flight (or past the current one)."""
    return (in_flight[-1].epoch if in_flight else epoch) + 1
