"""What every stage of a run shares: config, run directory, TensorBoard, and the long-lived actor groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.tensorboard import SummaryWriter

from actors.learner_group import LearnerGroup
from actors.rollout_group import RolloutActorGroup
from posterrl.config import Config
from posterrl.data.manifest import ManifestRow
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
    _rollouts: RolloutActorGroup | None = None
    _learners: LearnerGroup | None = None

    def progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=self.console,
                        disable=not self.config.logging.progress, transient=False)

    def rollout_group(self) -> RolloutActorGroup:
        """Started on first use and kept for the whole run."""
        if self._rollouts is None:
            self._rollouts = RolloutActorGroup(self.config)
        return self._rollouts

    def learner_group(self) -> LearnerGroup:
        """Started on first use; the same ranks serve every training stage."""
        if self._learners is None:
            self._learners = LearnerGroup(self.config)
        return self._learners

    def scalars(self, values: dict[str, float], step: int | None = None) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, self.global_step if step is None else step)

    def shutdown(self) -> None:
        if self._learners is not None:
            self._learners.shutdown()
        if self._rollouts is not None:
            self._rollouts.shutdown()
