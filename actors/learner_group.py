"""N learner ranks as Ray actors in one placement group, each wrapping `learner.core.Learner`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
import torch

from actors.cluster import rendezvous_host, threads_for
from actors.faults import ActorLost, RunAborted, wait_all
from actors.placement import Slots, learner_slots
from learner.core import Learner, StepStats
from posterrl.config import Config

SHUTDOWN_GRACE_S = 10.0  # how long ranks get to leave their process groups before they are killed


class LearnerGroup:
    def __init__(self, config: Config, slots: Slots | None = None):
        """The ranks, each in its bundle of `slots` (a colocated run's shared group), or of a placement group of
        their own (actors/placement.py)."""
        lc = config.learner
        self.gpus_per_rank = lc.gpus_per_rank
        self.timeout_s = config.cluster.call_timeout_s
        # ZeRO-3 shards each parameter over the ranks: a forward or a read of whole weights is a collective
        self.sharded = config.deepspeed.zero_stage == 3
        self.slots = slots or learner_slots(config)
        remote_learner = ray.remote(num_cpus=lc.cpus_per_rank, num_gpus=lc.gpus_per_rank)(Learner)
        self.ranks = [
            remote_learner.options(scheduling_strategy=self.slots.strategy(rank)).remote(
                config.model_dump(mode="json"), rank, lc.num_ranks, threads_for(lc.cpus_per_rank))
            for rank in range(lc.num_ranks)
        ]
        # Rank 0 opens the rendezvous store on loopback when every rank shares its node, else on the node IP
        # Ray reports; the store is bound before anyone is told its port. Every rank then joins at once.
        master_addr = rendezvous_host(self.ranks, self.timeout_s)
        master_port = self._wait([self.ranks[0].open_rendezvous.remote(master_addr)], "open_rendezvous")[0]
        self._wait([r.join.remote(master_addr, master_port) for r in self.ranks], "join")

    def _wait(self, refs: list[ray.ObjectRef], method: str) -> list:
        """The ranks' answers; a rank that died stops the run at once (the others would wait for it in a
        collective forever), naming the rank."""
        try:
            return wait_all(refs, self.timeout_s, [f"learner rank {rank} ({method})" for rank in range(len(refs))])
        except ActorLost as exc:
            raise RunAborted(f"{exc}\nthe learner group cannot go on without it; the run stops. Resume it with "
                             "--resume (from the stage's last checkpoint)") from exc

    def call(self, method: str, *args, **kwargs) -> list:
        """The same method on every rank, concurrently (collectives need all ranks)."""
        return self._wait([getattr(r, method).remote(*args, **kwargs) for r in self.ranks], method)

    def start(self, task: str, seed: int, **inputs: Any) -> int:
        """Start `task` (learner.tasks.TASKS) on every rank; inputs (weights, experts, pairs) go through the
        object store once. Returns the number of trainable parameters."""
        refs = {name: ray.put(value) for name, value in inputs.items()}
        return self.call("start", task, seed, **refs)[0]

    def train_step(self, batch: Sequence) -> StepStats:
        """One optimizer step of the running task on a global batch, stats averaged over ranks."""
        return self.call("train_step", ray.put(list(batch)))[0]

    def rank0(self, method: str, *args: Any) -> Any:
        """Rank 0's answer to a method every rank could give (the weights, a scoring pass): rank 0 alone runs it,
        or under ZeRO-3 every rank, whose shards it gathers."""
        return self._wait(self.rank0_refs(method, *args), method)[0]

    def rank0_refs(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        """The calls `rank0` waits for, rank 0's first (for callers that wait on them with others)."""
        return [getattr(rank, method).remote(*args) for rank in (self.ranks if self.sharded else self.ranks[:1])]

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self.rank0("policy_state")

    def shutdown(self) -> None:
        """Leave the process groups and stop the ranks. Ranks stuck in a collective (a peer died) do not
        answer: they get SHUTDOWN_GRACE_S, then every rank is killed either way, so none is left behind."""
        try:
            ray.wait([r.shutdown.remote() for r in self.ranks], num_returns=len(self.ranks), timeout=SHUTDOWN_GRACE_S)
        finally:
            for rank in self.ranks:
                ray.kill(rank)
            self.slots.release()
            self.ranks = []
