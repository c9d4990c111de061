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
from actors.learner_group import LearnerGroup
from actors.rollout_group import RolloutActorGroup


@dataclass
class Publication:
    """Weights on their way to the actors."""

    acks: list[ray.ObjectRef]  # one per actor: the seconds it spent loading
    handover_s: float  # the source's part: producing the object (object_store); 0 for broadcast
    others: list[ray.ObjectRef] = field(default_factory=list)  # the broadcast's sending side

    def wait(self) -> float:
        """Block until every actor holds the weights; the sync time is the handover plus the slowest load."""
        loads = ray.get(self.acks)
        ray.get(self.others)
        return self.handover_s + max(loads)


class WeightSync:
    def __init__(self, learners: LearnerGroup, rollouts: RolloutActorGroup, method: str):
        self.learners, self.rollouts, self.method = learners, rollouts, method
        if method == "broadcast":
            source = learners.ranks[0]
            world = 1 + len(rollouts.actors)
            addr = rendezvous_host([source, *rollouts.actors])  # loopback when all share the source's node
            port = ray.get(source.open_weight_broadcast.remote(addr, world))
            backend = "nccl" if learners.gpus_per_rank > 0 else "gloo"
            ray.get([source.join_weight_broadcast.remote(addr, port, world)]
                    + [a.join_weight_broadcast.remote(addr, port, i + 1, world, backend)
                       for i, a in enumerate(rollouts.actors)])
        elif method != "object_store":
            raise ValueError(f"rollout.weight_sync={method!r}: expected object_store or broadcast")

    def publish(self, version: int) -> Publication:
        """Start moving theta_old to every actor as `version`."""
        source = self.learners.ranks[0]
        if self.method == "object_store":
            began = time.perf_counter()
            weights = source.sampling_weights.remote()
            ray.wait([weights])
            return Publication(self.rollouts.publish(weights, version), time.perf_counter() - began)
        acks = [a.receive_weights.remote(version) for a in self.rollouts.actors]
        return Publication(acks, 0.0, [source.broadcast_sampling_weights.remote()])
