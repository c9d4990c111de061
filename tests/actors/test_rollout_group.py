import pytest
import ray
import torch

from actors.cluster import rendezvous_host
from actors.faults import FaultLog, RunAborted
from actors.learner_group import LearnerGroup
from actors.rollout_group import RolloutActorGroup
from actors.weight_sync import WeightSync, probe_tolerance
from posterrl.data.manifest import load_manifest, write_manifest
from posterrl.data.tasks import TASKS, build_samples, write_samples
from posterrl.flow import SamplerConfig
from posterrl.policy import EditPolicy
from rollout.worker import RolloutWorker

pytestmark = pytest.mark.integration


def test_weights_reach_every_actor_and_samples_match_in_process(ray_cluster, tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"rollout": tiny_config.rollout.model_copy(update={"num_steps": 2})})
    rows = []
    for index in range(2):
        rows += write_samples(build_samples(index, seed=5, size=32, tasks=TASKS, split="val"), tmp_path)
    write_manifest(rows, tmp_path / "manifest.jsonl")
    rows = load_manifest(tmp_path / "manifest.jsonl").rows

    # Weights that differ from the actors' own initialisation, so a missed sync would show.
    trained = EditPolicy.from_config(config.model.model_copy(update={"seed": 11}))
    group = RolloutActorGroup(config)
    try:
        assert len(group.actors) == config.rollout.num_actors == 2
        group.load_weights(trained.state_dict(), 3, FaultLog())
        chunks = group.submit(rows, group_size=2, base_seed=0, chunk=3)
        assert len(chunks) == 4  # 12 rows in chunks of 3, dealt to both actors
        assert [c.actor for c in chunks] == [0, 1, 0, 1]
        remote_groups = group.gather(chunks, "test", FaultLog())
    finally:
        group.shutdown()

    local = RolloutWorker(model=config.model.model_dump(mode="json"))
    local.load_weights(trained.state_dict(), version=3)
    local_groups = local.sample(rows, 2, 0, SamplerConfig(config.rollout.solver, 2, config.rollout.shift))
    assert [g.prompt_id for g in remote_groups] == [r.id for r in rows]
    for remote, here in zip(remote_groups, local_groups):
        assert remote.policy_version == 3
        assert torch.allclose(remote.samples, here.samples, atol=1e-4)


def test_broadcast_sync_meets_on_loopback_and_reaches_every_actor(ray_cluster, tiny_config):
    config = tiny_config.model_copy(deep=True)
    config.learner.num_ranks, config.learner.cpus_per_rank = 1, 0.1
    config.rollout.num_actors, config.rollout.cpus_per_actor = 2, 0.1
    trained = EditPolicy.from_config(config.model.model_copy(update={"seed": 11}))
    learners, rollouts = LearnerGroup(config), RolloutActorGroup(config)
    try:
        assert rendezvous_host([learners.ranks[0], *rollouts.actors], 60) == "127.0.0.1"  # one node: loopback only
        learners.start("nft", 0, init_state=trained.state_dict())
        sync = WeightSync(learners, rollouts, "broadcast", FaultLog())
        sync.publish(4).wait()
        def weights_sum(worker) -> float:  # local: shipped by value to the actors
            return sum(float(p.double().sum()) for p in worker.policy.parameters())

        sums = ray.get([a.__ray_call__.remote(weights_sum) for a in rollouts.actors])
    finally:
        learners.shutdown()
        rollouts.shutdown()
    expected = sum(float(p.double().sum()) for p in trained.parameters())
    assert sums == pytest.approx([expected, expected], rel=1e-9)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_corrupted_sync_stops_the_run(ray_cluster, tiny_config, dtype):
    """Each actor reports the fingerprint of what its policy holds after a sync; the driver compares it with learner
    rank 0's. An actor whose load bound zeros into one tensor (as a sync that silently missed a module would) stops
    the run with a message naming the actor, the version and the tensor, on both sync paths. bf16 rollouts are held
    to the same check (against theta_old rounded to bf16) and their probe stays within its tolerance."""
    config = tiny_config.model_copy(deep=True)
    config.rollout.dtype = dtype
    config.learner.num_ranks, config.learner.cpus_per_rank = 1, 0.1
    config.rollout.num_actors, config.rollout.cpus_per_actor = 2, 0.1
    trained = EditPolicy.from_config(config.model.model_copy(update={"seed": 11}))
    first_key = next(iter(trained.state_dict()))

    def corrupt_next_load(worker):  # runs inside the actor (shipped by value): one load binds zeros into a tensor
        report = worker._report

        def corrupted(began):
            worker._report = report
            state = worker.policy.policy_state()
            key = next(iter(state))
            worker.policy.load_policy_state({**state, key: torch.zeros_like(state[key])}, assign=True)
            return report(began)

        worker._report = corrupted

    learners, rollouts = LearnerGroup(config), RolloutActorGroup(config)
    try:
        learners.start("nft", 0, init_state=trained.state_dict())
        for version, method in ((1, "object_store"), (3, "broadcast")):
            sync = WeightSync(learners, rollouts, method, FaultLog(), probe_tol=probe_tolerance(config))
            sync.publish(version).wait()  # a clean sync passes its check
            assert sync.probe(version) < (1e-2 if dtype == "bf16" else 1e-6)
            ray.get(rollouts.actors[1].__ray_call__.remote(corrupt_next_load), timeout=60)
            with pytest.raises(RunAborted, match=rf"weight sync of version {version + 1}: rollout actor 1 holds other "
                                                 rf"weights than learner rank 0 sent \(1 of \d+ tensors differ: "
                                                 rf"{first_key}: sum 0 "):
                sync.publish(version + 1).wait()
    finally:
        learners.shutdown()
        rollouts.shutdown()


def test_the_probe_catches_a_policy_that_holds_the_weights_but_acts_otherwise(ray_cluster, tiny_config):
    """rollout.probe_every: each actor's output on a fixed input against rank 0's theta_old. An actor whose rotary
    ids (a buffer, not a weight: no fingerprint sees it) were shifted holds every weight right and still samples
    another function; the probe stops the run."""
    config = tiny_config.model_copy(deep=True)
    config.learner.num_ranks, config.learner.cpus_per_rank = 1, 0.1
    config.rollout.num_actors, config.rollout.cpus_per_actor = 2, 0.1
    trained = EditPolicy.from_config(config.model.model_copy(update={"seed": 11}))

    def shift_rotary_ids(worker):  # runs inside the actor
        worker.policy.noisy_ids += 1

    learners, rollouts = LearnerGroup(config), RolloutActorGroup(config)
    try:
        learners.start("nft", 0, init_state=trained.state_dict())
        sync = WeightSync(learners, rollouts, "object_store", FaultLog(), probe_every=1)
        assert sync.due_probe(1) and not WeightSync(learners, rollouts, "object_store", FaultLog()).due_probe(1)
        sync.publish(1).wait()
        assert sync.probe(1) < 1e-6  # every actor computes what theta_old computes (relative L2 error)
        ray.get(rollouts.actors[1].__ray_call__.remote(shift_rotary_ids), timeout=60)
        sync.publish(2).wait()  # the fingerprints agree: the weights are right
        with pytest.raises(RunAborted, match=r"weight sync of version 2: rollout actor 1's probe velocity differs by "
                                             r"[0-9.e-]+ \(relative L2; tolerance 0.0001\)"):
            sync.probe(2)
    finally:
        learners.shutdown()
        rollouts.shutdown()
