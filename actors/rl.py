"""The `rl` stage: DiffusionNFT on the policy's own rollouts, in the run's cluster.

One epoch: the rollout actors sample K edits per prompt with the sampling policy theta_old and hand
each finished chunk to the reward server (scoring overlaps sampling); the driver turns rewards into
optimality probabilities (per-prompt groups, global std); the learner group takes NFT steps on the
clean samples; theta_old is soft-updated and published to the rollout actors through the object
store. `rl.mode: off_policy` submits the next epoch's rollouts before training on this one, so
sampling and training overlap and rollouts are at most `rl.max_staleness` updates old.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from actors.context import PipelineContext
from actors.evaluation import evaluate, latest_policy_dir
from actors.faults import RewardGuard, RunAborted, ask_restartable, no_answer
from actors.rollout_group import Chunk, edit_samples
from actors.rollout_log import RolloutLog, oldest_policy_version
from actors.weight_sync import Publication, WeightSync, probe_tolerance
from learner.data import rl_batches, rl_prompts
from learner.nft import NoRetirement, PromptRetirement
from learner.scoring import EpochScores, score_epoch
from posterrl.checkpoints import latest_checkpoint
from posterrl.config import ConfigError
from posterrl.experience import Experience, RlSample
from posterrl.policies import load_policy
from posterrl.policy import SPEC_FILE

if TYPE_CHECKING:
    from learner.core import StepStats

ROLLOUT_SEED_OFFSET = 104_729  # rollout noise differs from evaluation's and the reward stage's


@dataclass
class RolloutTimes:
    rollout_s: float  # submission -> last chunk sampled
    reward_s: float  # last chunk sampled -> last reward in (what scoring adds beyond sampling)


@dataclass
class Pending:
    """Rollouts submitted to the actors, not yet collected: one epoch's chunks."""

    epoch: int
    chunks: list[Chunk]
    step: int  # the global step the reward server is told (where its changes line up in TensorBoard)
    submitted: float = field(default_factory=time.perf_counter)

    def collect(self, stage: RlStage) -> tuple[list[Experience], RolloutTimes]:
        """One Experience per submitted row, in submission order, with the reward server's answers.

        A chunk whose actor died is sampled again (same rows, seed and weights); a chunk whose reward answer
        was lost (the server out of retries, or the rollout actor that asked died) is scored again from
        here. Both are counted in faults/; nothing is dropped or taken twice.
        """
        rollouts, faults = stage.rollouts, stage.ctx.faults
        sampling: dict[ray.ObjectRef, Chunk] = {c.ref: c for c in self.chunks if c.ref is not None}
        scoring: dict[ray.ObjectRef, tuple[Chunk, int]] = {}  # rewards ref -> chunk, attempt
        sampled_at = self.submitted
        while sampling or scoring:
            ready, _ = ray.wait([*sampling, *scoring], num_returns=1, timeout=rollouts.timeout_s)
            if not ready:
                raise no_answer([c.what for c in sampling.values()]
                                + [f"the reward server ({c.what})" for c, _ in scoring.values()],
                                rollouts.timeout_s, f"rl epoch {self.epoch}")
            ref = ready[0]
            if ref in sampling:
                chunk = sampling.pop(ref)
                result = rollouts.receive(chunk, f"rl epoch {self.epoch}", faults)
                if result is None:  # its actor died: sent again
                    assert chunk.ref is not None
                    sampling[chunk.ref] = chunk
                    continue
                assert result.rewards is not None  # a scored chunk
                scoring[result.rewards] = (chunk, 1)
                sampled_at = time.perf_counter()
            else:
                chunk, attempt = scoring.pop(ref)
                try:
                    chunk.rewards = ray.get(ref, timeout=0)
                except (RayActorError, ObjectLostError) as exc:  # ObjectLostError: the asking actor died
                    if attempt >= rollouts.max_attempts:
                        raise RunAborted(f"rl epoch {self.epoch}: the reward server did not answer for {chunk.what} "
                                         f"in {attempt} attempts (rollout.max_chunk_attempts): {exc}") from exc
                    faults.record("reward_requests_retried", chunk.what)
                    assert chunk.groups is not None  # scored only once sampled
                    edits = [e for row, group in zip(chunk.rows, chunk.groups, strict=True)
                             for e in edit_samples(row, group)]
                    scoring[stage.server.score.remote(edits, self.step)] = (chunk, attempt + 1)
                except RayTaskError as exc:
                    raise RunAborted(f"rl epoch {self.epoch}: the reward server failed on {chunk.what}: {exc}") from exc
        reward_s = time.perf_counter() - sampled_at
        experiences = []
        for chunk in self.chunks:
            assert chunk.groups is not None and chunk.rewards is not None  # the loop above ran until both are in
            start = 0
            for row, group in zip(chunk.rows, chunk.groups, strict=True):
                k = group.samples.shape[0]
                experiences.append(Experience.from_rollout(row, group, chunk.rewards[start : start + k]))
                start += k
        return experiences, RolloutTimes(rollout_s=sampled_at - self.submitted, reward_s=reward_s)

    def wait(self, timeout_s: float) -> None:
        """Let chunks that will not be used finish (their results are dropped; failures do not matter)."""
        refs = [c.ref for c in self.chunks if c.ref is not None]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


@dataclass
class EpochTraining:
    """What one epoch's NFT steps and the sampling-policy publish gave."""

    steps: list[StepStats]
    eta: float
    train_s: float
    sync_s: float | None  # off_policy: the previous publish's (None on the first epoch)


def start_policy(ctx: PipelineContext) -> tuple[Path, dict]:
    """The policy RL starts from (and keeps as its KL reference): the run's distilled student."""
    source = ctx.run.stage_checkpoint("distill")
    if not (source / SPEC_FILE).is_file():
        newest = latest_policy_dir(ctx.run)
        if newest is None:
            raise ConfigError(f"rl: {ctx.run.root} has no exported policy to start from (run the distill stage first)")
        source = newest
    return source, load_policy(source).policy_state()


def group_means(experiences: list[Experience]) -> dict[str, float]:
    """prompt id -> mean reward of its scored samples, for the groups that have one (what retirement watches)."""
    return {e.prompt_id: float(np.nanmean(e.reward)) for e in experiences if np.isfinite(e.reward).any()}


def every(n: int, epoch: int) -> bool:
    """Epoch `epoch` (0-based) ends an n-epoch period."""
    return (epoch + 1) % n == 0


class RlStage:
    """The rl stage's driver: its actor groups, what a resume brings back, and the steps of one epoch."""

    def __init__(self, ctx: PipelineContext):
        cfg, rl = ctx.config, ctx.config.rl
        if not ctx.reward_available():
            raise ConfigError("rl: no reward server can start: reward.scorers is empty, or its bradley_terry scorer "
                              "serves the reward stage's model and that stage has not run (add 'reward' to stages)")
        self.ctx, self.rl = ctx, rl
        self.source, init_state = start_policy(ctx)
        self.rows = ctx.train_rows()
        self.learners, self.rollouts, self.server = ctx.learner_group(), ctx.rollout_group(), ctx.reward_server()
        self.learners.start("nft", rl.seed, init_state=init_state)
        self.checkpoint_dir = ctx.run.checkpoints / "deepspeed" / "rl"
        self.retirement: PromptRetirement | NoRetirement = (
            PromptRetirement(rl.retire_threshold, rl.retire_patience) if rl.retire_threshold is not None
            else NoRetirement())
        self.start_epoch, self.base_step = 0, ctx.global_step
        self.history: list[dict[str, Any]] = []  # one record per epoch: the stage's figures in summary.json
        if ctx.resume and latest_checkpoint(self.checkpoint_dir) is not None:  # a torn latest.json stops here
            state = self.learners.call("load_checkpoint", str(self.checkpoint_dir))[0]
            self.start_epoch, self.base_step, self.history = state["epoch"], state["base_step"], state["history"]
            self.retirement.load(state["retirement"])
            ctx.console.print(f"rl: resumed from {self.checkpoint_dir} at epoch {self.start_epoch}")
        # optimizer steps of the stage (after a resume: so far)
        self.learner_step = self.learners.call("current_step")[0]
        ctx.global_step = self.base_step + self.learner_step
        self.log = RolloutLog(ctx)
        self.base_seed = cfg.rollout.seed + ROLLOUT_SEED_OFFSET
        self.sync = WeightSync(self.learners, self.rollouts, cfg.rollout.weight_sync, ctx.faults,
                               probe_every=cfg.rollout.probe_every, probe_tol=probe_tolerance(cfg))
        self.guard = RewardGuard(rl.max_unscored_fraction, rl.unscored_patience)
        self.server_pid: int | None = None
        self.unresolved: Publication | None = None  # off_policy: the last publish, resolved an epoch later

    def submit(self, epoch: int) -> Pending:
        prompts = rl_prompts(self.rows, self.rl.prompts_per_epoch, self.rl.seed, epoch, self.retirement.retired)
        chunks = self.rollouts.submit(prompts, self.ctx.config.rollout.group_size, self.base_seed + epoch,
                                      reward_server=self.server, step=self.ctx.global_step)
        return Pending(epoch, chunks, self.ctx.global_step)

    def train(self, epoch: int, samples: list[RlSample]) -> EpochTraining:
        """rl.passes over the samples in rl_batches, then the soft update of theta_old, published as epoch + 1."""
        rl = self.rl
        began = time.perf_counter()
        if self.ctx.placement().colocated:  # the actors' GPU goes to the learner until the next sampling
            self.rollouts.offload()
        steps = [self.learners.train_step(batch) for pass_index in range(rl.passes)
                 for batch in rl_batches(samples, rl.batch_size, seed=[rl.seed, epoch, pass_index])]
        train_s = time.perf_counter() - began
        eta = self.learners.call("update_sampling_policy")[0]
        sync_s = self.publish(epoch + 1)
        self.learner_step = steps[-1].step if steps else self.learner_step
        self.ctx.global_step = self.base_step + self.learner_step
        return EpochTraining(steps, eta, train_s, sync_s)

    def publish(self, version: int) -> float | None:
        """sync: wait for the actors now; off_policy: they load after their queued rollouts, so the previous
        publish is resolved here instead (perf/weight_sync_s lags one epoch)."""
        publication = self.sync.publish(version)
        if self.rl.mode == "sync":
            seconds = publication.wait()
            # the probe needs theta_old unchanged since the publish: sync mode only (off_policy trains on)
            if self.sync.due_probe(version):
                self.ctx.scalars({"rollout/weight_probe_error": self.sync.probe(version)})
            return seconds
        previous, self.unresolved = self.unresolved, publication
        return previous.wait() if previous is not None else None

    def check_rewards(self, epoch: int, experiences: list[Experience]) -> None:
        """Count the samples without a reward, notice a restarted reward server, and stop the run when the
        reward guard trips (rl.max_unscored_fraction for rl.unscored_patience epochs)."""
        failed = [f for e in experiences for f in e.failed]
        rewarded = [bool(np.isfinite(value)) for e in experiences for value in e.reward]
        unscored = rewarded.count(False)
        if unscored:
            self.ctx.faults.record("unscored_samples", f"rl epoch {epoch}", unscored)
        described = ask_restartable(self.server.describe.remote, self.rollouts.timeout_s, "the reward server")
        self.ctx.faults.scorer_failures = described["failures"]
        pid = described["pid"]
        if self.server_pid is not None and pid != self.server_pid:
            event = self.ctx.faults.record("reward_server_restarts", f"pid {self.server_pid} -> {pid}")
            event.recovered_at = time.time()
        self.server_pid = pid
        self.guard.observe(epoch, rewarded, failed)

    def log_epoch(self, epoch: int, experiences: list[Experience], scored: EpochScores, times: RolloutTimes,
                  trained: EpochTraining, began: float) -> dict[str, float]:
        """The epoch's scalars to TensorBoard, and on their cadence the rollout grids and the dumps."""
        rl = self.rl
        values = self.log.scalars(experiences, scored)
        steps = trained.steps
        if steps:
            values.update({"learner/loss": float(np.mean([s.loss for s in steps])),
                           "learner/grad_norm": float(np.mean([s.grad_norm for s in steps])),
                           **{f"learner/{k}": float(np.mean([s.extra[k] for s in steps]))
                              for k in steps[0].extra if k != "r_mean"}})
        images = sum(e.size for e in experiences)
        values.update({
            "rl/eta": trained.eta, "rl/steps": float(len(steps)),
            "rl/staleness": float(epoch - oldest_policy_version(experiences)),
            "rl/retired_prompts": float(len(self.retirement.retired)),
            "perf/rollout_s": times.rollout_s, "perf/reward_s": times.reward_s, "perf/train_s": trained.train_s,
            "perf/images_per_s": images / max(times.rollout_s, 1e-9),
            "perf/epoch_s": time.perf_counter() - began,
        })
        if trained.sync_s is not None:
            values["perf/weight_sync_s"] = trained.sync_s
        values.update(self.ctx.faults.scalars())
        self.ctx.scalars(values)
        if every(rl.log_images_every, epoch) or epoch == self.start_epoch:
            self.log.grids(epoch, experiences, rl.log_groups)
        if every(rl.dump_every, epoch) or epoch + 1 == rl.epochs:
            self.log.dump(epoch, experiences)
        return values

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """The held-out evaluation after `epoch`, as the fields its history record gains."""
        evaluation = evaluate(self.ctx, None, f"rl epoch {epoch + 1}", version=epoch + 1)
        return {"gold": evaluation.gold["mean"], "eval_reward": evaluation.reward.get("mean")}

    def save_checkpoint(self, epoch: int) -> None:
        """The learners' checkpoint, with the stage's own state as its client_state (what a resume reads)."""
        state = {"epoch": epoch, "base_step": self.base_step, "history": self.history,
                 "retirement": self.retirement.state()}
        self.learners.call("save_checkpoint", str(self.checkpoint_dir), state, self.ctx.config.learner.keep_checkpoints)

    def run(self) -> dict[str, Any]:
        ctx, rl = self.ctx, self.rl
        self.sync.publish(self.start_epoch).wait()
        in_flight: deque[Pending] = deque()
        ahead = rl.max_staleness if rl.mode == "off_policy" else 0
        with ctx.progress() as progress:
            bar = progress.add_task("rl: DiffusionNFT", total=rl.epochs, completed=self.start_epoch, info="")
            for epoch in range(self.start_epoch, rl.epochs):
                began = time.perf_counter()
                if not in_flight:
                    in_flight.append(self.submit(epoch))
                experiences, times = in_flight.popleft().collect(self)
                self.check_rewards(epoch, experiences)
                # off_policy: the next epochs' rollouts start now, on the weights the actors hold, while we train.
                while len(in_flight) < ahead and in_flight_end(in_flight, epoch) < rl.epochs:
                    in_flight.append(self.submit(in_flight_end(in_flight, epoch)))
                scored = score_epoch(experiences, rl.adv_max, rl.min_group_std, rl.advantage_std)
                trained = self.train(epoch, scored.samples)
                newly_retired = self.retirement.observe(group_means(experiences))
                values = self.log_epoch(epoch, experiences, scored, times, trained, began)
                version = oldest_policy_version(experiences)
                record = {"epoch": epoch + 1, "step": ctx.global_step, "reward": values.get("reward/combined/mean"),
                          "policy_version": version}
                if every(rl.eval_every, epoch) and epoch + 1 < rl.epochs:
                    progress.stop()
                    record.update(self.evaluate(epoch))
                    progress.start()
                self.history.append(record)
                if epoch + 1 < rl.epochs and (every(rl.checkpoint_every, epoch) or ctx.stop_requested):
                    self.save_checkpoint(epoch + 1)
                info = (f"reward {values.get('reward/combined/mean', float('nan')):.3f}  "
                        f"|A| {values['rl/advantage_abs_mean']:.2f}  v{version}")
                if newly_retired:
                    info += f"  retired {len(newly_retired)}"
                progress.update(bar, completed=epoch + 1, info=info)
                if epoch + 1 < rl.epochs and ctx.stop_requested:
                    for pending in in_flight:  # off_policy: a resume submits these again
                        pending.wait(self.rollouts.timeout_s)
                    ctx.stop_point(f"rl epoch {epoch + 1}, after its checkpoint")
            for pending in in_flight:  # off_policy: rollouts past the last epoch are not used
                pending.wait(self.rollouts.timeout_s)
        self.save_checkpoint(rl.epochs)
        export_dir = ctx.run.stage_checkpoint("rl")
        self.learners.call("export", str(export_dir))
        return {"start_policy": str(self.source), "mode": rl.mode, "epochs": rl.epochs, "history": self.history,
                "export": str(export_dir), "steps": self.learner_step, "faults": self.ctx.faults.counts}


def run_rl(ctx: PipelineContext) -> dict[str, Any]:
    return RlStage(ctx).run()


def in_flight_end(in_flight: deque, epoch: int) -> int:
    """The next epoch to submit: one past the last one in flight (or past the current one)."""
    return (in_flight[-1].epoch if in_flight else epoch) + 1
