"""Where the learner ranks and the rollout actors run: Ray placement groups per cluster.placement.

disaggregated: each role reserves a placement group of its own, one bundle per learner rank (PACK: the ranks'
collectives stay on few nodes) and one per rollout actor, so sampling and training hold separate GPUs.
colocated: one group of learner.num_ranks bundles; learner rank r and rollout actors r, r + R, ... share bundle
r, so one GPU holds a rank and its actors (fractions, e.g. 0.5 + 0.5). The rl stage then moves the rollout
policy off the GPU while the learner trains (RolloutWorker.offload) and back for the next sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.faults import RunAborted
from posterrl.config import Config


def reserve(bundles: list[dict[str, float]], timeout_s: float, what: str) -> PlacementGroup:
    """A placement group of `bundles` (PACK), once the cluster has made room for all of them."""
    group = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise RunAborted(f"the cluster has no room for {what} ({len(bundles)} x {bundles[0]}) after {timeout_s:g} s "
                         "(cluster.call_timeout_s): check the role's cpus / gpus / resources against `ray status`")
    return group


def _bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **resources}


@dataclass
class Slots:
    """The bundles a role's members are scheduled into: member i goes to bundle indices[i] of `group`."""

    group: PlacementGroup
    indices: list[int]
    owned: bool  # the role reserved the group itself and removes it when it stops

    def strategy(self, member: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=self.indices[member])

    def release(self) -> None:
        if self.owned:
            remove_placement_group(self.group)


def learner_slots(config: Config) -> Slots:
    """A group of the learner ranks' own (disaggregated)."""
    lc = config.learner
    bundle = _bundle(lc.cpus_per_rank, lc.gpus_per_rank, lc.resources)
    group = reserve([bundle] * lc.num_ranks, config.cluster.call_timeout_s, f"{lc.num_ranks} learner rank(s)")
    return Slots(group, list(range(lc.num_ranks)), owned=True)


def rollout_slots(config: Config) -> Slots:
    """A group of the rollout actors' own (disaggregated)."""
    rc = config.rollout
    bundle = _bundle(rc.cpus_per_actor, rc.gpus_per_actor, rc.resources)
    group = reserve([bundle] * rc.num_actors, config.cluster.call_timeout_s, f"{rc.num_actors} rollout actor(s)")
    return Slots(group, list(range(rc.num_actors)), owned=True)


class RunPlacement:
    """The run's placement: with cluster.placement=colocated one group shared by both roles (reserved at once),
    else nothing shared (each role reserves its own group when it starts)."""

    def __init__(self, config: Config):
        self.config = config
        self.shared: PlacementGroup | None = None
        if config.cluster.placement == "colocated":
            lc, rc = config.learner, config.rollout
            per_rank = rc.num_actors // lc.num_ranks  # validated: a whole number
            resources = {k: lc.resources.get(k, 0) + per_rank * rc.resources.get(k, 0)
                         for k in {*lc.resources, *rc.resources}}
            bundle = _bundle(lc.cpus_per_rank + per_rank * rc.cpus_per_actor,
                             lc.gpus_per_rank + per_rank * rc.gpus_per_actor, resources)
            self.shared = reserve([bundle] * lc.num_ranks, config.cluster.call_timeout_s,
                                  f"{lc.num_ranks} learner rank(s) with {per_rank} rollout actor(s) each")

    @property
    def colocated(self) -> bool:
        return self.shared is not None

    def learners(self) -> Slots:
        if self.shared is None:
            return learner_slots(self.config)
        return Slots(self.shared, list(range(self.config.learner.num_ranks)), owned=False)

    def rollouts(self) -> Slots:
        if self.shared is None:
            return rollout_slots(self.config)
        ranks = self.config.learner.num_ranks
        return Slots(self.shared, [i % ranks for i in range(self.config.rollout.num_actors)], owned=False)

    def release(self) -> None:
        if self.shared is not None:
            remove_placement_group(self.shared)
            self.shared = None
