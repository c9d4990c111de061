"""M rollout actors, each a `RolloutWorker` wrapped with `ray.remote` at spawn time.

The actors are restartable (rollout.max_restarts): Ray brings a dead actor back in a new process
with random weights, so every rl chunk carries the weights it must be sampled with (an object-store
reference and its version, nested so Ray does not fetch it unless the actor needs it). A restarted
actor loads them before sampling; a chunk whose actor died is dispatched again with the same rows,
seed and weights, so it gives the samples it would have given.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from PIL import Image
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from actors.cluster import threads_for
from actors.faults import ActorLost, FaultEvent, FaultLog, RunAborted, no_answer, wait_all
from actors.placement import Slots, rollout_slots
from posterrl.config import Config
from posterrl.data.manifest import ManifestRow
from posterrl.flow import SamplerConfig
from posterrl.models.samples import EditSample
from posterrl.weight_sync import Fingerprint, fingerprint, fingerprint_mismatch
from rollout.worker import RolloutGroup, RolloutWorker, WeightLoad


def output_size(row: ManifestRow, group: RolloutGroup) -> tuple[int, int]:
    """(w, h) of the edits as scorers and dumps see them: the target's size when the row has one (as the
    evaluation scores it), else the output aspect at the first input's long side. Sizes come from the
    files' headers, nothing is decoded."""
    if row.target is not None:
        with Image.open(row.target) as target:
            return target.size
    with Image.open(row.inputs[0]) as first_input:
        long_side = max(first_input.size)
    w, h = group.output_aspect
    return (long_side, max(1, round(long_side * h / w))) if w >= h else (max(1, round(long_side * w / h)), long_side)


def edit_samples(row: ManifestRow, group: RolloutGroup) -> list[EditSample]:
    """The K samples of a group as the scorers see them: images at the output size, with the row's inputs and meta."""
    inputs, target = row.load_inputs(), row.load_target()
    return [EditSample(row.id, row.task, row.instruction, inputs, image, row.meta, target)
            for image in group.output_images(size=output_size(row, group))]


@dataclass
class ChunkResult:
    """What a rollout actor returns for one chunk."""

    groups: list[RolloutGroup]
    rewards: ray.ObjectRef | None  # scored chunks: the reward server's answer for the samples (group-major)
    pid: int  # the actor's process: a new one means Ray restarted the actor


@dataclass
class Chunk:
    """Rows sampled together on one actor, and where they are on their way."""

    index: int
    rows: list[ManifestRow]
    group_size: int
    base_seed: int
    weights: list  # [object ref or None, version]: the weights the rows are sampled with
    scoring: tuple | None = None  # (reward server, step): the actor sends the samples on to be scored
    actor: int = 0
    ref: ray.ObjectRef | None = None  # -> ChunkResult
    attempts: int = 0
    groups: list[RolloutGroup] | None = None
    rewards: list | None = None
    errors: list[str] = field(default_factory=list)
    losses: list[FaultEvent] = field(default_factory=list)  # the faults that made it be sent again

    @property
    def what(self) -> str:
        return f"rollout chunk {self.index} on actor {self.actor} (prompts {', '.join(r.id for r in self.rows)})"


class RolloutActor(RolloutWorker):
    """A RolloutWorker that hands each finished chunk straight to the reward server, so scoring overlaps sampling."""

    def sample_chunk(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int, sampler: SamplerConfig,
                     weights: list) -> ChunkResult:
        """K samples per row with the given weights."""
        self.ensure_weights(*weights)
        return ChunkResult(self.sample(rows, group_size, base_seed, sampler), None, os.getpid())

    def sample_and_score(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int, sampler: SamplerConfig,
                         weights: list, reward_server, step: int) -> ChunkResult:
        """K samples per row with the given weights, plus the reward server's answer for all of them."""
        self.ensure_weights(*weights)
        groups = self.sample(rows, group_size, base_seed, sampler)
        edits = [edit for row, group in zip(rows, groups, strict=True) for edit in edit_samples(row, group)]
        return ChunkResult(groups, reward_server.score.remote(edits, step), os.getpid())

    def ensure_weights(self, ref: ray.ObjectRef | None, version: int) -> None:
        """Load `version` unless it is what the actor holds (it does unless Ray restarted it)."""
        if self.policy_version == version:
            return
        if ref is None:
            raise RuntimeError(f"rollout actor (pid {os.getpid()}) holds weights version {self.policy_version}, the "
                               f"chunk needs {version}, and rollout.weight_sync=broadcast keeps no copy to load: "
                               "a restarted actor cannot rejoin a broadcast group (use weight_sync object_store)")
        self.load_weights(ray.get(ref, timeout=600), version)

    def pid(self) -> int:
        return os.getpid()


class RolloutActorGroup:
    def __init__(self, config: Config, slots: Slots | None = None):
        """The actors, each in its bundle of `slots` (a colocated run's shared group), or of a placement group of
        their own (actors/placement.py)."""
        rc = config.rollout
        self.timeout_s = config.cluster.call_timeout_s
        self.max_attempts = rc.max_chunk_attempts
        self.slots = slots or rollout_slots(config)
        remote_worker = ray.remote(num_cpus=rc.cpus_per_actor, num_gpus=rc.gpus_per_actor,
                                   resources=rc.resources or None)(RolloutActor)
        # No task retries by Ray: the driver dispatches a lost chunk again itself, with its weights, and counts it.
        self.actors = [
            remote_worker.options(max_restarts=rc.max_restarts, max_task_retries=0,
                                  scheduling_strategy=self.slots.strategy(i)).remote(
                model=config.model.model_dump(mode="json"), num_threads=threads_for(rc.cpus_per_actor),
                device="cuda" if rc.gpus_per_actor > 0 else "cpu", dtype=rc.dtype)
            for i in range(rc.num_actors)
        ]
        self.sampler = SamplerConfig.from_rollout(rc)
        self.dead: set[int] = set()  # actors out of restarts
        self.restarting: set[int] = set()  # actors a call found unavailable, until they answer again
        self.pids: list[int | None] = [None] * rc.num_actors
        # Each actor's first process, asked before any chunk: an actor killed before it ever answered a chunk
        # still shows its restart by answering from another process.
        self.first_pids = [actor.pid.remote() for actor in self.actors]
        # The last weights published through the object store, and their version: what chunks carry.
        self.current: tuple[ray.ObjectRef | None, int] = (None, 0)

    def publish(self, weights: dict[str, torch.Tensor | np.ndarray] | ray.ObjectRef,
                version: int) -> list[ray.ObjectRef]:
        """Hand new weights to every actor: one object in the object store that every actor reads.

        Returns the actors' acknowledgements (a WeightLoad each). Each actor loads after the
        tasks already queued on it, so rollouts submitted before the publish keep their old version.
        """
        weights_ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        self.current = (weights_ref, version)
        return [self.actors[i].load_weights.remote(weights_ref, version) for i in self.live()]

    def set_version(self, version: int) -> None:
        """Weights that reached the actors another way (a broadcast): chunks carry the version, no copy."""
        self.current = (None, version)

    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.dead]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor | np.ndarray], version: int,
                     faults: FaultLog) -> None:
        """Publish and wait until every actor holds the weights, verified against their fingerprint. An actor
        that dies meanwhile is counted and loads them with its next chunk (chunks carry the weights), so it
        does not stop the run."""
        actors = self.live()
        self.await_loads(actors, self.publish(state_dict, version), faults, expected=fingerprint(state_dict))

    def await_loads(self, actors: list[int], acks: list[ray.ObjectRef], faults: FaultLog,
                    restorable: bool = True, expected: Fingerprint | None = None) -> list[WeightLoad]:
        """What each actor reports after loading weights (acks[i] from actors[i]), of those that answered.
        restorable (the weights are in the object store): an actor that died meanwhile is counted and loads
        them with its next chunk; otherwise its death stops the run. With `expected` (the sender's fingerprint),
        an actor that holds other tensors than were sent stops the run, naming them."""
        _, pending = ray.wait(acks, num_returns=len(acks), timeout=self.timeout_s)
        if pending:
            raise no_answer([f"rollout actor {a} (load weights)" for a, r in zip(actors, acks, strict=True)
                             if r in pending], self.timeout_s)
        loads = []
        for actor, ack in zip(actors, acks, strict=True):
            try:
                load: WeightLoad = ray.get(ack, timeout=0)
            except RayActorError as exc:
                if not restorable:
                    raise ActorLost(f"rollout actor {actor} (load weights)", exc) from exc
                faults.record("weight_loads_lost", f"rollout actor {actor}")
                continue
            problem = None if expected is None else fingerprint_mismatch(expected, load.fingerprint)
            if problem is not None:
                raise RunAborted(f"weight sync of version {load.version}: rollout actor {actor} holds other weights "
                                 f"than learner rank 0 sent ({problem}); stopping rather than sampling from weights "
                                 "nobody trained")
            loads.append(load)
        return loads

    def _chunks(self, rows: Sequence[ManifestRow], chunk: int) -> list[list[ManifestRow]]:
        return [list(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]

    def submit(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int, chunk: int = 4,
               reward_server=None, step: int = 0) -> list[Chunk]:
        """Chunks of rows dealt round-robin to the actors, each carrying the current weights; chunk.ref resolves
        to a ChunkResult. With a reward server, each actor sends its chunk on to be scored as soon as it is
        sampled (scoring overlaps sampling), and the result carries the answer's ref."""
        chunks = [Chunk(i, c, group_size, base_seed, list(self.current),
                        (reward_server, step) if reward_server is not None else None)
                  for i, c in enumerate(self._chunks(rows, chunk))]
        live = self.live()
        for chunk_ in chunks:
            self.dispatch(chunk_, live[chunk_.index % len(live)])
        return chunks

    def dispatch(self, chunk: Chunk, actor: int) -> None:
        if chunk.attempts >= self.max_attempts:
            raise RunAborted(f"{chunk.what} failed {chunk.attempts} times (rollout.max_chunk_attempts): "
                             + "; ".join(chunk.errors))
        chunk.actor, chunk.attempts = actor, chunk.attempts + 1
        handle = self.actors[actor]
        args = (chunk.rows, chunk.group_size, chunk.base_seed, self.sampler, chunk.weights)
        chunk.ref = (handle.sample_and_score.remote(*args, *chunk.scoring) if chunk.scoring is not None
                     else handle.sample_chunk.remote(*args))

    def redispatch(self, chunk: Chunk, error: Exception) -> None:
        """A chunk whose actor died: to another live actor that is not restarting (any actor gives the same
        samples for the same rows, seed and weights), else to the first one that is back. A call to an actor
        while Ray restarts it fails at once (ActorUnavailableError), so a restarting actor is waited for with
        pings, which cost no attempt."""
        chunk.errors.append(f"attempt {chunk.attempts} on actor {chunk.actor}: {type(error).__name__}")
        if isinstance(error, ActorDiedError):  # out of restarts (ActorUnavailableError: restarting)
            self.dead.add(chunk.actor)
        else:
            self.restarting.add(chunk.actor)
        live = self.live()
        if not live:
            raise RunAborted(f"every rollout actor died and is out of restarts (rollout.max_restarts); last: "
                             f"{chunk.what}: {error}")
        order = sorted(live, key=lambda a: (a in self.restarting, (a - chunk.actor - 1) % len(self.actors)))
        self.dispatch(chunk, order[0] if order[0] not in self.restarting else self.first_back(order))

    def first_back(self, actors: list[int]) -> int:
        """The first of `actors` (all restarting) that answers a ping, waiting up to timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            pings = {self.actors[a].pid.remote(): a for a in actors}
            ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=min(5.0, self.timeout_s))
            for ref in ready:
                try:
                    ray.get(ref, timeout=0)
                except RayActorError as exc:
                    if isinstance(exc, ActorDiedError):
                        self.dead.add(pings[ref])
                    continue
                self.restarting.discard(pings[ref])
                return pings[ref]
            actors = [a for a in actors if a not in self.dead]
            if not actors:
                raise RunAborted("every rollout actor died and is out of restarts (rollout.max_restarts)")
            time.sleep(0.5)
        raise RunAborted(f"rollout actors {actors} did not come back within {self.timeout_s:g} s after dying "
                         "(cluster.call_timeout_s)")

    def gather(self, chunks: list[Chunk], what: str, faults: FaultLog) -> list[RolloutGroup]:
        """The groups of unscored chunks, in row order. A chunk whose actor died is sampled again (counted);
        nothing answering for timeout_s stops the run, naming what is missing."""
        waiting = {c.ref: c for c in chunks}
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=self.timeout_s)
            if not ready:
                raise no_answer([c.what for c in waiting.values()], self.timeout_s, what)
            chunk = waiting.pop(ready[0])
            if self.receive(chunk, what, faults) is None:
                assert chunk.ref is not None  # sent again
                waiting[chunk.ref] = chunk
        return [group for chunk in chunks for group in chunk.groups or []]

    def receive(self, chunk: Chunk, what: str, faults: FaultLog) -> ChunkResult | None:
        """The answer of a chunk whose ref is ready (its groups kept on the chunk); None when its actor died,
        and the chunk was sent again (counted, and timed until its answer)."""
        assert chunk.ref is not None  # dispatched
        try:
            result: ChunkResult = ray.get(chunk.ref, timeout=0)
        except RayActorError as exc:
            chunk.losses.append(faults.record("rollout_chunks_redispatched", f"{what}: {chunk.what}"))
            self.redispatch(chunk, exc)
            return None
        except RayTaskError as exc:
            raise RunAborted(f"{what}: {chunk.what} failed: {exc}") from exc
        now = time.time()
        if self.note_pid(chunk.actor, result.pid):
            faults.record("rollout_actor_restarts", f"rollout actor {chunk.actor}").recovered_at = now
        for loss in chunk.losses:
            loss.recovered_at = now
        chunk.groups = result.groups
        return result

    def note_pid(self, actor: int, pid: int) -> bool:
        """Remember the process an actor answered from; True when it changed (Ray restarted the actor)."""
        known = self.pids[actor] if self.pids[actor] is not None else self.first_pid(actor)
        changed = known is not None and known != pid
        self.pids[actor] = pid
        self.restarting.discard(actor)
        return changed

    def first_pid(self, actor: int) -> int | None:
        """The process the actor started in; None when that process died before it answered."""
        try:
            return ray.get(self.first_pids[actor], timeout=self.timeout_s)
        except RayActorError:
            return None

    def offload(self) -> None:
        """Colocated placement: every live actor moves its policy off the GPU until its next sampling (the learner
        trains on that GPU meanwhile); waits until they have."""
        wait_all([self.actors[i].offload.remote() for i in self.live()], self.timeout_s,
                 [f"rollout actor {i} (offload)" for i in self.live()])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.slots.release()
