"""Two nodes of one Ray cluster (ray.cluster_utils.Cluster: separate raylets on this machine), each offering a
custom resource; `posterrl run --address` with learner.resources and rollout.resources puts the learner group
on one node and the rollout actors (and the reward server) on the other, as on a real multi-node cluster, and
runs an rl epoch of the tiny FLUX.1 Kontext model across them. Placement is read back through Ray's state API."""

import json
import subprocess
import sys

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = ["stages=[data,sft,distill,rl]", "distill.steps=2", "distill.eval_every=2", "distill.checkpoint_every=2",
             "data.n_train=2", "data.n_val=1", "data.chunks=1", "rollout.eval_per_task=1",
             "rollout.num_steps=2", "sft.steps=2", "sft.eval_every=2", "sft.checkpoint_every=2", "rl.epochs=1",
             "rl.prompts_per_epoch=6", "rollout.group_size=2", "rl.batch_size=4", "rl.eval_every=1",
             "logging.progress=false", "reward.scorers=[{name: keep, kind: preservation}]",
             "learner.resources={learner_node: 1}", "rollout.resources={rollout_node: 1}",
             "reward.resources={rollout_node: 1}"]


def posterrl(*args):
    proc = subprocess.run([sys.executable, "-m", "posterrl.cli", *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"posterrl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"learner_node": 4},
                                                             "include_dashboard": True})
    rollout_node = cluster.add_node(num_cpus=3, resources={"rollout_node": 4})
    cluster.wait_for_nodes()
    try:
        yield cluster, cluster.head_node.node_id, rollout_node.node_id
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_learners_and_rollouts_run_on_their_own_nodes(two_nodes, tmp_path):
    cluster, head, rollout_node = two_nodes
    checkpoint = tmp_path / "flux_kontext_tiny"
    posterrl("model", "make-tiny", "--kind", "flux_kontext", "--out", str(checkpoint))
    run_dir = tmp_path / "run"
    posterrl("run", "configs/flux_kontext_tiny.yaml", *OVERRIDES, f"model.pretrained_path={checkpoint}",
             "--run-dir", str(run_dir), "--address", cluster.address)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["rl"]["epochs"] == 1 and summary["stages"]["rl"]["steps"] > 0

    ray.init(address=cluster.address)
    nodes = {}
    for actor in list_actors(detail=True, limit=1000, raise_on_missing_output=False):
        nodes.setdefault(actor.class_name, set()).add(actor.node_id)
    assert nodes["Learner"] == {head}, nodes  # both ranks, every stage
    assert nodes["RolloutActor"] == {rollout_node}, nodes
    assert nodes["RewardServer"] == {rollout_node}, nodes
