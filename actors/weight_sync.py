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
from ray.exceptions import RayActorError

from actors.cluster import rendezvous_host
from actors.faults import FaultLog, RunAborted, wait_all
from actors.learner_group import LearnerGroup
from actors.rollout_group import RolloutActorGroup


@dataclass
class Publication:
    """Weights on their way to the actors."""

    acks: list[ray.ObjectRef]  # one per live actor: the seconds it spent loading
    actors: list[int]  # the actors the acks come from
    handover_s: float  # the source's part: producing the object (object_store); 0 for broadcast
    timeout_s: float
    faults: FaultLog
    restorable: bool  # object_store: an actor that died while loading loads the weights with its next chunk
    others: list[ray.ObjectRef] = field(default_factory=list)  # the broadcast's sending side

    def wait(self) -> float:
        """Block until every actor holds the weights; the sync time is the handover plus the slowest load.
        An actor that died meanwhile (object_store) is counted, and loads the weights with its next chunk."""
        loads = []
        ready, pending = ray.wait(self.acks, num_returns=len(self.acks), timeout=self.timeout_s)
        for actor, ack in zip(self.actors, self.acks, strict=True):
            if ack in pending:
                continue
            try:
                loads.append(ray.get(ack, timeout=0))
            except RayActorError:
                if not self.restorable:
                    raise
                self.faults.record("weight_loads_lost", f"rollout actor {actor}")
        if pending:
            names = [f"rollout actor {a} (load weights)" for a, ack in zip(self.actors, self.acks, strict=True)
                     if ack in pending]
            raise RunAborted(f"no answer from {', '.join(names)} for {self.timeout_s:g} s (cluster.call_timeout_s); "
                             "the run stops (resume it with --resume)")
        wait_all(self.others, self.timeout_s, ["learner rank 0 (broadcast weights)"] * len(self.others))
        return self.handover_s + max(loads, default=0.0)


class WeightSync:
    def __init__(self, learners: LearnerGroup, rollouts: RolloutActorGroup, method: str, faults: FaultLog):
        self.learners, self.rollouts, self.method, self.faults = learners, rollouts, method, faults
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

    def publish(self, version: int) -> Publication:
        """Start moving theta_old to every actor as `version`."""
        source = self.learners.ranks[0]
        if self.method == "object_store":
            began = time.perf_counter()
            weights = source.sampling_weights.remote()
            wait_all([weights], self.timeout_s, ["learner rank 0 (sampling weights)"])
            acks = self.rollouts.publish(weights, version)
            return Publication(acks, self.rollouts.live(), time.perf_counter() - began, self.timeout_s, self.faults,
                               restorable=True)
        acks = [a.receive_weights.remote(version) for a in self.rollouts.actors]
        self.rollouts.set_version(version)
        return Publication(acks, list(range(len(acks))), 0.0, self.timeout_s, self.faults, restorable=False,
                           others=[source.broadcast_sampling_weights.remote()])
