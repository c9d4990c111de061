"""Publishing the sampling policy from learner rank 0 to the rollout actors, timed.

`object_store`: rank 0 puts theta_old (numpy arrays) into the object store once; every actor reads
the same object (zero-copy on one node). `broadcast`: rank 0 and the actors form a process group of
their own (posterrl.weight_sync; NCCL on GPU, gloo on CPU) and rank 0 broadcasts one flat buffer.
Either way an actor loads new weights after the tasks already queued on it, so rollouts submitted
before a publish keep their version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from actors.cluster import rendezvous_host
from actors.faults import FaultLog, RunAborted, wait_all
from actors.learner_group import LearnerGroup
from actors.rollout_group import RolloutActorGroup
from posterrl.config import Config
from posterrl.weight_sync import probe_error, probe_mismatch


@dataclass
class Publication:
    """Weights on their way to the actors."""

    rollouts: RolloutActorGroup
    acks: list[ray.ObjectRef]  # one per live actor: its WeightLoad
    actors: list[int]  # the actors the acks come from
    handover_s: float  # the source's part: producing the object (object_store); 0 for broadcast
    faults: FaultLog
    restorable: bool  # object_store: an actor that died while loading loads the weights with its next chunk
    expected: ray.ObjectRef | None = None  # learner rank 0's fingerprint of what it sent
    others: list[ray.ObjectRef] = field(default_factory=list)  # the broadcast's sending side

    def wait(self) -> float:
        """Block until every actor holds the weights and each has shown, by its fingerprint, that it holds the
        tensors rank 0 sent (a mismatch stops the run); the sync time is the handover plus the slowest load."""
        expected = None
        if self.expected is not None:
            expected = wait_all([self.expected], self.rollouts.timeout_s, ["learner rank 0 (sampling fingerprint)"])[0]
        loads = self.rollouts.await_loads(self.actors, self.acks, self.faults, self.restorable, expected)
        wait_all(self.others, self.rollouts.timeout_s, ["learner rank 0 (broadcast weights)"] * len(self.others))
        return self.handover_s + max((load.seconds for load in loads), default=0.0)


def probe_tolerance(config: Config) -> float:
    """How far an actor's probe velocity may be from rank 0's (relative L2): float32 on both sides agrees to
    round-off; a bf16 learner's theta_old, or bf16 rollouts, run the probe in bf16 (about 3 significant digits)."""
    return 5e-2 if "bf16" in (config.deepspeed.precision, config.rollout.dtype) else 1e-4


class WeightSync:
    def __init__(self, learners: LearnerGroup, rollouts: RolloutActorGroup, method: str, faults: FaultLog,
                 probe_every: int = 0, probe_tol: float = 1e-4):
        """probe_every: every this many publishes (by version), compare each actor's output on the probe input with
        rank 0's theta_old (0: fingerprints only)."""
        self.learners, self.rollouts, self.method, self.faults = learners, rollouts, method, faults
        self.probe_every, self.probe_tol = probe_every, probe_tol
        self.timeout_s = learners.timeout_s
        if method == "broadcast":
            source = learners.ranks[0]
            world = 1 + len(rollouts.actors)
            # loopback when all share the source's node
            addr = rendezvous_host([source, *rollouts.actors], self.timeout_s)
            port = wait_all([source.open_weight_broadcast.remote(addr, world)], self.timeout_s,
                            ["learner rank 0 (open weight broadcast)"])[0]
            backend = "nccl" if learners.gpus_per_rank > 0 else "gloo"
            wait_all([source.join_weight_broadcast.remote(addr, port, world)]
                     + [a.join_weight_broadcast.remote(addr, port, i + 1, world, backend)
                        for i, a in enumerate(rollouts.actors)], self.timeout_s,
                     ["learner rank 0 (join weight broadcast)"]
                     + [f"rollout actor {i} (join weight broadcast)" for i in range(len(rollouts.actors))])
        elif method != "object_store":
            raise ValueError(f"rollout.weight_sync={method!r}: expected object_store or broadcast")

    def probe(self, version: int) -> float:
        """Every actor's policy output on the fixed probe input against rank 0's theta_old; a difference beyond
        the tolerance stops the run, else the largest relative error is returned. Call once the weights of
        `version` are in (after Publication.wait)."""
        live = self.rollouts.live()
        learner_refs = self.learners.rank0_refs("sampling_probe")
        refs = learner_refs + [self.rollouts.actors[i].probe.remote() for i in live]
        answers = wait_all(refs, self.timeout_s, [f"learner rank {r} (probe)" for r in range(len(learner_refs))]
                           + [f"rollout actor {i} (probe)" for i in live])
        expected, outputs = answers[0], answers[len(learner_refs):]
        for actor, output in zip(live, outputs, strict=True):
            problem = probe_mismatch(expected, output, self.probe_tol)
            if problem is not None:
                raise RunAborted(f"weight sync of version {version}: rollout actor {actor}'s {problem}; stopping "
                                 "rather than sampling from a policy that is not the one trained")
        return max((probe_error(expected, output) for output in outputs), default=0.0)

    def due_probe(self, version: int) -> bool:
        return self.probe_every > 0 and version % self.probe_every == 0

    def publish(self, version: int) -> Publication:
        """Start moving theta_old to every actor as `version`."""
        source = self.learners.ranks[0]
        if self.method == "object_store":
            began = time.perf_counter()
            weights = source.sampling_weights.remote()
            wait_all([weights], self.timeout_s, ["learner rank 0 (sampling weights)"])
            actors = self.rollouts.live()
            acks = self.rollouts.publish(weights, version)
            return Publication(self.rollouts, acks, actors, time.perf_counter() - began, self.faults, restorable=True,
                               expected=source.sampling_fingerprint.remote())
        acks = [a.receive_weights.remote(version) for a in self.rollouts.actors]
        self.rollouts.set_version(version)
        return Publication(self.rollouts, acks, list(range(len(acks))), 0.0, self.faults, restorable=False,
                           expected=source.sampling_fingerprint.remote(),
                           others=[source.broadcast_sampling_weights.remote()])
