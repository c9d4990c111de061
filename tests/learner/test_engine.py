"""The learner role in-process at world size 1 (no Ray): DeepSpeed on gloo, fp32 and bf16."""

import pytest
import torch
import torch.distributed as dist

from learner.engine import Learner
from posterrl.batch import RlSample
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


def rl_samples(tiny_policy, n: int, r: float):
    """n scored 'rollout samples' of one filling-like prompt (1 input), all with optimality probability r."""
    g = torch.Generator().manual_seed(0)
    res = tiny_policy.spec.resolution
    return [RlSample(f"p{i // 2}", "filling", "fill the gap", torch.rand(1, 3, res, res, generator=g) * 2 - 1,
                     torch.rand(3, res, res, generator=g) * 2 - 1, r) for i in range(n)]


def test_rl_step_moves_theta_and_the_soft_update_moves_theta_old(learner, tiny_policy, tmp_path):
    learner.config.rl.batch_size, learner.config.rl.kl_coef = 4, 1e-2
    learner.start_rl_stage(tiny_policy.state_dict(), seed=0)
    start = learner.parameter_checksum()
    assert learner.sampling_checksum() == pytest.approx(start) and learner.reference is not None
    stats = learner.train_rl_step(rl_samples(tiny_policy, 4, r=1.0))
    assert stats.step == 1 and stats.loss == stats.loss and stats.grad_norm > 0
    assert stats.extra["kl"] == pytest.approx(0.0, abs=1e-10)  # theta equals the reference before the step
    assert stats.extra["r_mean"] == pytest.approx(1.0)
    moved = learner.parameter_checksum()
    assert moved != start and learner.sampling_checksum() == pytest.approx(start)  # theta_old waits for the epoch end
    assert learner.train_rl_step(rl_samples(tiny_policy, 4, r=1.0)).extra["kl"] > 0
    # The first soft update has eta = min(0.001 * 0, 0.5) = 0: theta_old becomes theta.
    assert learner.update_sampling_policy() == 0.0
    assert learner.sampling_checksum() == pytest.approx(learner.parameter_checksum(), rel=1e-9)
    assert learner.update_sampling_policy() == pytest.approx(0.001)
    # A checkpoint keeps theta_old and the update count.
    learner.save_checkpoint(str(tmp_path / "ck"), {"epoch": 2})
    saved_old = learner.sampling_checksum()
    learner.train_rl_step(rl_samples(tiny_policy, 4, r=0.0))
    learner.update_sampling_policy()
    learner.load_checkpoint(str(tmp_path / "ck"))
    assert learner.sampling_checksum() == pytest.approx(saved_old, rel=1e-12) and learner.sampling_updates == 2
    weights = learner.sampling_weights()
    assert set(weights) == set(tiny_policy.state_dict()) and all(w.dtype.name == "float32" for w in weights.values())
