"""2 learner ranks through real Ray and real DeepSpeed (ZeRO-2, gloo)."""

import pytest

from actors.learner_group import LearnerGroup
from posterrl.data.manifest import load_manifest, write_manifest
from posterrl.data.tasks import build_samples, write_samples

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fixed_batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch")
    rows = []
    for index in range(4):
        rows += write_samples(build_samples(index, seed=2, size=32, tasks=("filling",), split="train"), out)
    write_manifest(rows, out / "manifest.jsonl")
    return load_manifest(out / "manifest.jsonl", require_target=True).rows


@pytest.fixture(scope="module")
def config(tiny_config):
    config = tiny_config.model_copy(deep=True)
    config.learner.num_ranks, config.learner.micro_batch_size, config.learner.warmup_steps = 2, 1, 0
    config.sft.batch_size, config.sft.lr = 4, 2e-3
    return config


def test_two_ranks_train_resume_and_stay_in_sync(ray_cluster, config, fixed_batch, tmp_path):
    group = LearnerGroup(config)
    try:
        group.start("sft", seed=0)
        losses, checksums = [], []
        for step in range(8):
            stats = group.train_step(fixed_batch)
            losses.append(stats.loss)
            assert stats.step == step + 1 and stats.samples == 4
            checksums.append(group.call("parameter_checksum"))
            if step + 1 == 5:
                group.call("save_checkpoint", str(tmp_path / "ck"), {"data_position": 5}, 2)
        # Finite and falling on a fixed batch.
        assert all(l == l and l < 10 for l in losses)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
        # Identical parameters on both ranks after every step (ZeRO-2 all-gathers the updated shards).
        for per_rank in checksums:
            assert per_rank[0] == per_rank[1]
        assert checksums[0][0] != checksums[-1][0]
    finally:
        group.shutdown()  # kills both actors

    resumed = LearnerGroup(config)
    try:
        resumed.start("sft", seed=0)
        state = resumed.call("load_checkpoint", str(tmp_path / "ck"))
        assert [s["data_position"] for s in state] == [5, 5]
        again = [resumed.train_step(fixed_batch).loss for _ in range(3)]
        assert again == pytest.approx(losses[5:], rel=1e-5, abs=1e-6)
        assert resumed.call("parameter_checksum")[0] == pytest.approx(checksums[-1][0], rel=1e-6)
    finally:
        resumed.shutdown()


def test_checkpoints_are_atomic_and_pruned(ray_cluster, config, fixed_batch, tmp_path):
    learner = config.learner.model_copy(update={"num_ranks": 1, "micro_batch_size": 4})
    group = LearnerGroup(config.model_copy(update={"learner": learner}))
    try:
        group.start("sft", seed=0)
        for _ in range(3):
            group.train_step(fixed_batch)
            group.call("save_checkpoint", str(tmp_path / "ck"), {"data_position": 0}, 2)
        tags = sorted(p.name for p in (tmp_path / "ck").glob("step_*"))
        assert tags == ["step_0000002", "step_0000003"]
        # A save that died half-way (a tag directory without latest.json pointing at it) is ignored.
        (tmp_path / "ck" / "step_0000009").mkdir()
        group.train_step(fixed_batch)
        state = group.call("load_checkpoint", str(tmp_path / "ck"))[0]
        assert state["step"] == 3
    finally:
        group.shutdown()
