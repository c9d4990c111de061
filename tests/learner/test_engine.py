"""The learner role in-process at world size 1 (no Ray): DeepSpeed on gloo, fp32 and bf16."""

import pytest
import torch
import torch.distributed as dist

from learner.engine import Learner
from posterrl.data.manifest import load_manifest, write_manifest
from posterrl.data.tasks import build_samples, write_samples
from posterrl.policy import EditPolicy


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows")
    manifest = []
    for index in range(2):
        manifest += write_samples(build_samples(index, seed=1, size=32, tasks=("filling", "extending")), out)
    write_manifest(manifest, out / "manifest.jsonl")
    return load_manifest(out / "manifest.jsonl", require_target=True).rows


@pytest.fixture(scope="module")
def learner(tiny_config):
    config = tiny_config.model_copy(update={"learner": tiny_config.learner.model_copy(
        update={"num_ranks": 1, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0})})
    role = Learner(config.model_dump(mode="json"), rank=0, world_size=1)
    host, port = Learner.free_address()
    assert role.join("127.0.0.1", port) == 0
    yield role
    role.shutdown()
    assert not dist.is_initialized()


def test_train_step_accumulates_and_exports(learner, rows, tmp_path):
    learner.start_stage("unit", None, seed=0)
    before = learner.parameter_checksum()
    stats = learner.train_step(rows, "sft")
    assert stats.step == 1 and stats.samples == 4 and stats.loss == stats.loss and stats.grad_norm > 0
    assert stats.extra["fm_loss"] == pytest.approx(stats.loss)
    assert learner.parameter_checksum() != before
    learner.export(str(tmp_path / "export"))
    reloaded = EditPolicy.from_pretrained(tmp_path / "export")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, learner.state_dict()[key])


def test_distill_objective_needs_and_uses_experts(learner, rows, tiny_policy):
    learner.start_stage("unit-distill", tiny_policy.state_dict(), seed=0)
    learner.set_experts({"local": tiny_policy.state_dict(), "global": tiny_policy.state_dict()})
    stats = learner.train_step(rows, "distill")
    # The student starts equal to both experts, so at step 1 the matching term is exactly zero.
    assert stats.extra["distill_loss"] == pytest.approx(0.0, abs=1e-8)
    stats = learner.train_step(rows, "distill")
    assert stats.extra["distill_loss"] > 0


def test_bf16_engine_trains(learner, rows):
    learner.config.deepspeed.precision = "bf16"
    try:
        learner.start_stage("unit-bf16", None, seed=0)
        assert next(learner.policy.parameters()).dtype == torch.bfloat16
        stats = learner.train_step(rows, "sft")
        assert stats.loss == stats.loss and stats.loss < 10
    finally:
        learner.config.deepspeed.precision = "fp32"
