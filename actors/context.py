"""What every stage of a run shares: config, run directory, TensorBoard, and the long-lived actor groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.tensorboard import SummaryWriter

from actors.faults import FaultLog, no_answer, wait_all
from actors.learner_group import LearnerGroup
from actors.placement import RunPlacement
from actors.reward_server import start_reward_server
from actors.rollout_group import RolloutActorGroup
from posterrl.config import Config
from posterrl.data.manifest import ManifestRow
from posterrl.errors import Interrupted
from posterrl.models.reward_model import MODEL_SPEC_FILE
from posterrl.runlog import RunDir


@dataclass
class PipelineContext:
    config: Config
    run: RunDir
    console: Console
    writer: SummaryWriter | None
    resume: bool = False
    global_step: int = 0  # learner steps over all stages so far: the x axis of TensorBoard
    rows: dict[str, list[ManifestRow]] = field(default_factory=dict)  # split -> rows, loaded once by the data stage
    faults: FaultLog = field(default_factory=FaultLog)  # what the run survived, for faults/... and summary.json
    stop_requested: bool = False  # Ctrl-C: stop at the next safe point, after a checkpoint
    stage: str = "setup"  # the stage running now (what a stopped run's summary names)
    _rollouts: RolloutActorGroup | None = None
    _learners: LearnerGroup | None = None
    _placement: RunPlacement | None = None
    _reward_server: ray.actor.ActorHandle | None = None  # the named reward-server actor (start_reward_server)

    def train_rows(self) -> list[ManifestRow]:
        """The training split's rows of the tasks this run trains (data.tasks)."""
        return [r for r in self.rows["train"] if r.task in self.config.data.tasks]

    def reward_available(self) -> bool:
        """A reward server runs, or can start: the reward stage has exported its model, or no scorer needs it."""
        if self._reward_server is not None:
            return True
        needs_stage = any(s.kind == "bradley_terry" and s.path is None for s in self.config.reward.scorers)
        trained = (self.run.stage_checkpoint("reward") / MODEL_SPEC_FILE).is_file()
        return bool(self.config.reward.scorers) and (trained or not needs_stage)

    def reward_server(self, reload: bool = False) -> ray.actor.ActorHandle:
        """The run's named reward server, started on first use; it lives until the run ends.

        reload: a server that was already running reloads the bradley_terry scorers the reward stage
        serves (a swap to the same path: version + 1, so results show the retrained model).
        """
        if self._reward_server is None:
            self._reward_server = start_reward_server(self.config, self.run)
        elif reload:
            for scorer in self.config.reward.scorers:
                if scorer.kind == "bradley_terry" and scorer.path is None:
                    answer = wait_all([self._reward_server.swap.remote(scorer.name)],
                                      self.config.cluster.call_timeout_s, ["the reward server (swap)"])[0]
                    if not answer["ok"]:
                        raise RuntimeError(f"reward server: reloading {scorer.name} failed: {answer['error']}")
        return self._reward_server

    def progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=self.console,
                        disable=not self.config.logging.progress, transient=False)

    def wait_with_progress(self, refs: Sequence[ray.ObjectRef], description: str) -> None:
        """Block until every ref is ready, with a bar of how many are."""
        with self.progress() as progress:
            bar = progress.add_task(description, total=len(refs), info="")
            pending = list(refs)
            timeout_s = self.config.cluster.call_timeout_s
            while pending:  # failures surface in the caller's wait_all
                ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
                if not ready:
                    raise no_answer([f"{len(pending)} of {len(refs)} tasks"], timeout_s, description)
                progress.update(bar, completed=len(refs) - len(pending))

    def stop_point(self, where: str) -> None:
        """A safe place to stop (the caller has checkpointed what it must): after Ctrl-C, raise Interrupted."""
        if self.stop_requested:
            raise Interrupted(f"stopped by Ctrl-C at {where}; continue with --resume")

    def placement(self) -> RunPlacement:
        """Reserved on first use (colocated: the shared group; disaggregated: each role reserves its own)."""
        if self._placement is None:
            self._placement = RunPlacement(self.config)
        return self._placement

    def rollout_group(self) -> RolloutActorGroup:
        """Started on first use and kept for the whole run."""
        if self._rollouts is None:
            self._rollouts = RolloutActorGroup(self.config, self.placement().rollouts())
        return self._rollouts

    def learner_group(self) -> LearnerGroup:
        """Started on first use; the same ranks serve every training stage."""
        if self._learners is None:
            self._learners = LearnerGroup(self.config, self.placement().learners())
        return self._learners

    def scalars(self, values: dict[str, float], step: int | None = None) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, self.global_step if step is None else step)

    def shutdown(self) -> None:
        if self._reward_server is not None:
            ray.kill(self._reward_server, no_restart=True)
            self._reward_server = None
        if self._learners is not None:
            self._learners.shutdown()
        if self._rollouts is not None:
            self._rollouts.shutdown()
        if self._placement is not None:
            self._placement.release()
