"""Faults the driver survives or stops on, and the waits that notice them.

Every recovery is counted here (TensorBoard `faults/<kind>`, summary.json "faults"), never swallowed:
a rollout actor that died and was restarted by Ray, a chunk of prompts dispatched again, a reward
answer asked for again, a reward server that came back under a new process. Faults the run cannot
survive (a learner rank died, nothing moved for `cluster.call_timeout_s`) raise `RunAborted` with a
message that names what failed; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from posterrl.errors import UserError

FAULT_KINDS = (
    "rollout_actor_restarts",  # a rollout actor answered from a new process (Ray restarted it)
    "rollout_chunks_redispatched",  # a chunk whose actor died before answering, sampled again
    "weight_loads_lost",  # an actor died while loading published weights (it loads them with its next chunk)
    "reward_requests_retried",  # a chunk's rewards asked for again by the driver (server or owner died)
    "reward_server_restarts",  # the reward server answered from a new process
    "unscored_samples",  # samples without a reward (a live scorer failed), not trained on
)


class RunAborted(UserError):
    """A fault the run does not survive; the message names it and what the user can do."""

    exit_code = 1


@dataclass
class FaultEvent:
    kind: str
    what: str  # e.g. "rollout actor 1", "chunk 3 of epoch 5"
    detected_at: float  # wall clock (time.time()), so a benchmark outside the driver can match its kills
    recovered_at: float | None = None


@dataclass
class FaultLog:
    """Counts per kind and the events behind them (recovery times), for TensorBoard and summary.json."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    events: list[FaultEvent] = field(default_factory=list)
    # the reward server's dropped scores, {scorer: {kind: count}} since it (re)started, as it reports them
    scorer_failures: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, kind: str, what: str, n: int = 1) -> FaultEvent:
        if kind not in self.counts:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        self.counts[kind] += n
        event = FaultEvent(kind, what, time.time())
        self.events.append(event)
        return event

    def scalars(self) -> dict[str, float]:
        return {**{f"faults/{kind}": float(count) for kind, count in self.counts.items()},
                **{f"faults/scorer/{name}/{kind}": float(count) for name, kinds in self.scorer_failures.items()
                   for kind, count in kinds.items()}}

    def summary(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "scorer_failures": self.scorer_failures,
                "events": [{"kind": e.kind, "what": e.what, "detected_at": e.detected_at,
                            "recovered_at": e.recovered_at} for e in self.events[-1000:]]}


def no_answer(waiting: Sequence[str], timeout_s: float, where: str = "") -> RunAborted:
    """The error for waits that saw no answer for timeout_s, naming what they waited for."""
    return RunAborted(f"{where + ': ' if where else ''}no answer for {timeout_s:g} s (cluster.call_timeout_s) from "
                      f"{'; '.join(waiting)}; the run stops (resume it with --resume)")


def wait_all(refs: Sequence[ray.ObjectRef], timeout_s: float, what: Sequence[str]) -> list[Any]:
    """ray.get of every ref, failing fast: the first ref that fails raises at once (a dead actor is noticed
    as soon as Ray knows, even while the others wait on it in a collective), and no ref finishing for
    timeout_s raises RunAborted naming what is still pending. what[i] names refs[i] in messages."""
    index = {ref: i for i, ref in enumerate(refs)}
    pending, results = list(refs), [None] * len(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if not ready:
            raise no_answer([what[index[ref]] for ref in pending], timeout_s)
        for ref in ready:
            try:
                results[index[ref]] = ray.get(ref, timeout=0)  # ready: does not block
            except RayActorError as exc:
                raise ActorLost(what[index[ref]], exc) from exc
    return results


class ActorLost(RunAborted):
    """An actor the run needs died (or its node did) while answering."""

    def __init__(self, what: str, cause: BaseException):
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"{what} died: {type(cause).__name__}: {first_line}")
        self.what = what


class RewardGuard:
    """Stops a run whose rewards are gone: more than max_fraction of an epoch's samples without a reward, for
    `patience` epochs in a row (otherwise an rl stage whose scorer broke would take 0-step epochs forever)."""

    def __init__(self, max_fraction: float, patience: int):
        self.max_fraction, self.patience = max_fraction, patience
        self.streak: list[int] = []  # the epochs of the current run of unscored ones

    def observe(self, epoch: int, rewarded: Sequence[bool], failed: Sequence[dict[str, str]]) -> None:
        """rewarded: per sample of the epoch, whether it has a reward; failed: its {scorer: reason} of dropped
        scores (shadow scorers' included, which do not cost the sample its reward)."""
        unscored = [f for ok, f in zip(rewarded, failed, strict=True) if not ok]
        fraction = len(unscored) / max(len(failed), 1)
        if fraction <= self.max_fraction:
            self.streak = []
            return
        self.streak.append(epoch)
        if len(self.streak) < self.patience:
            return
        reasons: dict[str, dict[str, int]] = {}
        for sample in unscored:
            for scorer, reason in sample.items():
                per_scorer = reasons.setdefault(scorer, {})
                per_scorer[reason] = per_scorer.get(reason, 0) + 1
        what = "; ".join(f"scorer {scorer!r}: " + ", ".join(f"{reason} ({n} samples)" for reason, n in
                                                            sorted(counts.items(), key=lambda item: -item[1])[:3])
                         for scorer, counts in sorted(reasons.items()))
        raise RunAborted(f"reward guard: {fraction:.0%} of the samples of rl epoch {epoch} had no reward, over "
                         f"{self.max_fraction:.0%} for {len(self.streak)} epochs in a row (epochs "
                         f"{self.streak[0]}-{epoch}; rl.max_unscored_fraction, rl.unscored_patience). {what}. "
                         "Fix or swap the scorer (posterrl reward swap / set-weight) and resume with --resume")


def ask_restartable(call: Callable[[], ray.ObjectRef], timeout_s: float, what: str) -> Any:
    """The answer of an actor Ray restarts (the reward server): a call made while it is restarting fails at
    once (ActorUnavailableError), so it is made again until the actor answers or timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return wait_all([call()], max(deadline - time.monotonic(), 0.001), [what])[0]
        except ActorLost as exc:
            if not isinstance(exc.__cause__, ActorUnavailableError) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
