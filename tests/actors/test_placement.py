"""cluster.placement on a real local Ray cluster: disaggregated gives each role a placement group of its own;
colocated puts rollout actor i into learner rank i % R's bundle (one GPU would hold both), read back from the
resources Ray assigned to each actor (bundle resources are named <resource>_group_<bundle>_<group id>)."""

import re

import pytest
import ray

from actors.faults import RunAborted
from actors.learner_group import LearnerGroup
from actors.placement import RunPlacement, reserve
from actors.rollout_group import RolloutActorGroup

pytestmark = pytest.mark.integration


def group_of(actor) -> str:
    """The placement group an actor runs in, as the actor itself sees it."""

    def current(_):  # runs inside the actor
        return ray.get_runtime_context().get_placement_group_id()

    return ray.get(actor.__ray_call__.remote(current), timeout=60)


def used_in_bundles(group_id: str) -> dict[int, float]:
    """CPU in use in each bundle of a group: Ray names a bundle's resources CPU_group_<index>_<group id> (and
    lists no available amount once it is all taken)."""
    available = ray.available_resources()
    used = {}
    for name, total in ray.cluster_resources().items():
        match = re.fullmatch(rf"CPU_group_(\d+)_{group_id}", name)
        if match:
            used[int(match.group(1))] = round(total - available.get(name, 0.0), 6)
    return used


# 24 s each, mostly the actors' start: colocated in the default suite; disaggregated (what every other integration
# test's groups do) in the slow one
@pytest.mark.parametrize("mode", ["colocated", pytest.param("disaggregated", marks=pytest.mark.slow)])
def test_roles_land_in_the_groups_the_mode_gives(ray_cluster, tiny_config, mode):
    config = tiny_config.model_copy(deep=True)
    config.cluster.placement = mode
    config.learner.num_ranks, config.learner.cpus_per_rank = 2, 0.25
    config.rollout.num_actors, config.rollout.cpus_per_actor = 4, 0.25
    placement = RunPlacement(config)
    colocated = placement.colocated
    learner_slots, rollout_slots = placement.learners(), placement.rollouts()
    learners = LearnerGroup(config, learner_slots)
    rollouts = RolloutActorGroup(config, rollout_slots)
    try:
        rank_groups = {group_of(r) for r in learners.ranks}
        actor_groups = {group_of(a) for a in rollouts.actors}
        used = {group: used_in_bundles(group) for group in rank_groups | actor_groups}
        rollouts.offload()  # the colocated hand-over; on a CPU the policy stays where it is
    finally:
        learners.shutdown()
        rollouts.shutdown()
        placement.release()
    assert learner_slots.indices == [0, 1]
    if mode == "colocated":
        assert colocated and rank_groups == actor_groups and len(rank_groups) == 1  # one shared group
        assert rollout_slots.indices == [0, 1, 0, 1]  # actor i with rank i % 2
        # each bundle holds a rank (0.25 CPU) and two actors (2 x 0.25)
        assert used == {rank_groups.pop(): {0: 0.75, 1: 0.75}}
    else:
        assert not colocated and len(rank_groups) == len(actor_groups) == 1
        assert rank_groups.isdisjoint(actor_groups) and rollout_slots.indices == [0, 1, 2, 3]
        assert used == {rank_groups.pop(): {0: 0.25, 1: 0.25}, actor_groups.pop(): {i: 0.25 for i in range(4)}}
    # released with the groups
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())


def test_a_group_the_cluster_cannot_hold_is_said_with_its_size(ray_cluster):
    with pytest.raises(RunAborted, match=r"no room for 2 learner rank\(s\) \(2 x \{'CPU': 64\}\) after 1 s"):
        reserve([{"CPU": 64}] * 2, 1, "2 learner rank(s)")
