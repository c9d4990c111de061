"""The learner core in-process at world size 1 (no Ray): every task through DeepSpeed on gloo, fp32 and bf16."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from learner.core import Learner
from learner.safe_load import load_rng_state, save_rng_state
from learner.tasks import TASKS
from posterrl.checkpoints import LATEST_FILE, CheckpointError, read_latest, write_checkpoint_manifest
from posterrl.data.manifest import load_manifest, write_manifest
from posterrl.data.tasks import build_samples, write_samples
from posterrl.experience import RlSample
from posterrl.models.reward_model import load_reward_model, pair_sides, reward_model_spec
from posterrl.models.samples import PreferencePair
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
    config = tiny_config.model_copy(deep=True)
    config.learner.num_ranks, config.learner.micro_batch_size, config.learner.warmup_steps = 1, 2, 0
    config.sft.batch_size = config.distill.batch_size = 4
    role = Learner(config.model_dump(mode="json"), rank=0, world_size=1)
    port = role.open_rendezvous("127.0.0.1")
    assert role.join("127.0.0.1", port) == 0
    yield role
    role.shutdown()
    assert not dist.is_initialized()


def test_every_stage_has_a_task():
    assert set(TASKS) == {"sft", "distill", "nft", "reward_model"}


def test_sft_step_accumulates_and_exports(learner, rows, tmp_path):
    learner.start("sft", seed=0)
    before = learner.parameter_checksum()
    stats = learner.train_step(rows)
    assert stats.step == 1 and stats.samples == 4 and stats.loss == stats.loss and stats.grad_norm > 0
    assert stats.extra["fm_loss"] == pytest.approx(stats.loss)
    assert learner.parameter_checksum() != before
    learner.export(str(tmp_path / "export"))
    reloaded = EditPolicy.from_pretrained(tmp_path / "export")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, learner.policy_state()[key])


def test_a_method_of_another_task_names_the_running_one(learner):
    learner.start("sft", seed=0)
    with pytest.raises(RuntimeError, match="runs task 'sft', not NftTask"):
        learner.update_sampling_policy()


def test_distill_uses_the_experts(learner, rows, tiny_policy):
    state = tiny_policy.state_dict()
    learner.start("distill", seed=0, expert_states={"local": state, "global": state}, init_state=state)
    stats = learner.train_step(rows)
    # The student starts equal to both experts, so at step 1 the matching term is exactly zero.
    assert stats.extra["distill_loss"] == pytest.approx(0.0, abs=1e-8)
    stats = learner.train_step(rows)
    assert stats.extra["distill_loss"] > 0


def test_bf16_engine_trains(learner, rows):
    learner.config.deepspeed.precision = "bf16"
    try:
        learner.start("sft", seed=0)
        assert next(learner.module.parameters()).dtype == torch.bfloat16
        stats = learner.train_step(rows)
        assert stats.loss == stats.loss and stats.loss < 10
    finally:
        learner.config.deepspeed.precision = "fp32"


def rl_samples(tiny_policy, n: int, r: float):
    """n scored 'rollout samples' of one filling-like prompt (1 input), all with optimality probability r."""
    g = torch.Generator().manual_seed(0)
    res = tiny_policy.spec.resolution
    return [RlSample(f"p{i // 2}", "filling", "fill the gap", torch.rand(1, 3, res, res, generator=g) * 2 - 1,
                     torch.rand(3, res, res, generator=g) * 2 - 1, r) for i in range(n)]


def test_nft_step_moves_theta_and_the_soft_update_moves_theta_old(learner, tiny_policy, tmp_path):
    learner.config.rl.batch_size, learner.config.rl.kl_coef = 4, 1e-2
    learner.start("nft", seed=0, init_state=tiny_policy.state_dict())
    start = learner.parameter_checksum()
    assert learner.sampling_checksum() == pytest.approx(start) and learner.task.reference is not None
    stats = learner.train_step(rl_samples(tiny_policy, 4, r=1.0))
    assert stats.step == 1 and stats.loss == stats.loss and stats.grad_norm > 0
    assert stats.extra["kl"] == pytest.approx(0.0, abs=1e-10)  # theta equals the reference before the step
    assert stats.extra["r_mean"] == pytest.approx(1.0)
    moved = learner.parameter_checksum()
    assert moved != start and learner.sampling_checksum() == pytest.approx(start)  # theta_old waits for the epoch end
    assert learner.train_step(rl_samples(tiny_policy, 4, r=1.0)).extra["kl"] > 0
    # The first soft update has eta = min(0.001 * 0, 0.5) = 0: theta_old becomes theta.
    assert learner.update_sampling_policy() == 0.0
    assert learner.sampling_checksum() == pytest.approx(learner.parameter_checksum(), rel=1e-9)
    assert learner.update_sampling_policy() == pytest.approx(0.001)
    # A checkpoint keeps theta_old (as the task's safetensors state) and the update count.
    learner.save_checkpoint(str(tmp_path / "ck"), {"epoch": 2})
    assert (tmp_path / "ck" / "step_0000002" / "task_state.safetensors").is_file()
    saved_old = learner.sampling_checksum()
    learner.train_step(rl_samples(tiny_policy, 4, r=0.0))
    learner.update_sampling_policy()
    assert learner.sampling_checksum() != pytest.approx(saved_old, rel=1e-12)
    state = learner.load_checkpoint(str(tmp_path / "ck"))
    assert state["epoch"] == 2 and state["task"] == "nft"
    assert learner.sampling_checksum() == pytest.approx(saved_old, rel=1e-12) and learner.task.sampling_updates == 2
    weights = learner.sampling_weights()
    assert set(weights) == set(tiny_policy.state_dict()) and all(w.dtype.name == "float32" for w in weights.values())
    # The rl stage exports theta_old, the policy its rollouts came from.
    learner.export(str(tmp_path / "rl"))
    exported = EditPolicy.from_pretrained(tmp_path / "rl")
    assert sum(float(p.double().sum()) for p in exported.parameters()) == pytest.approx(saved_old, rel=1e-9)


def test_reward_model_trains_on_pair_indices_and_exports(learner, tmp_path):
    pairs = []
    for index in range(4):
        for s in build_samples(index, 0, 32, ("filling", "style-driven")):
            pairs.append(PreferencePair(s.id, s.task, s.instruction, s.inputs, s.target, s.inputs[0]))
    rm = learner.config.reward_model
    rm.batch_size, rm.channels, rm.image_size = 4, 8, 32
    spec = reward_model_spec(rm)
    assert learner.start("reward_model", seed=0, spec=spec, pairs=pairs) > 0
    before = learner.parameter_checksum()
    losses = [learner.train_step([(2 * step + i) % len(pairs) for i in range(4)]).loss for step in range(6)]
    assert all(loss == loss for loss in losses) and learner.parameter_checksum() != before
    chosen, rejected = learner.pair_scores(pairs)
    assert len(chosen) == len(rejected) == len(pairs)
    learner.export(str(tmp_path / "rm"))
    served = load_reward_model(tmp_path / "rm").eval()
    with torch.no_grad():
        again = served(**served.prepare(pair_sides(pairs[:2])[0]))
    assert again.tolist() == pytest.approx(chosen[:2], abs=1e-5)



class _Planted:
    """A pickle that creates `marker` when it is loaded: what a hostile checkpoint folder could hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_rank0.safetensors"])
def test_a_planted_pickle_is_refused_and_never_runs(learner, rows, tmp_path, victim):
    learner.start("sft", seed=0)
    learner.train_step(rows)
    learner.save_checkpoint(str(tmp_path / "ck"), {"epoch": 1})
    folder = tmp_path / "ck" / "step_0000001"
    marker = tmp_path / "pwned"
    assert (folder / victim).is_file()
    if victim.endswith(".pt"):
        torch.save({"module": _Planted(marker)}, folder / victim)
    else:
        (folder / victim).write_bytes(pickle.dumps(_Planted(marker)))
    write_checkpoint_manifest(folder)  # whoever planted it rewrote the manifest too: the load itself refuses
    with pytest.raises(CheckpointError, match=victim):
        learner.load_checkpoint(str(tmp_path / "ck"))
    assert not marker.exists()


def test_rng_states_round_trip_without_pickle(tmp_path):
    save_rng_state(tmp_path / "rng.safetensors")
    drawn = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    load_rng_state(tmp_path / "rng.safetensors")
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2:] == again[2:]


def _save_steps(learner, rows, root, steps, keep_last=2):
    tags = []
    for _ in range(steps):
        learner.train_step(rows)
        tags.append(learner.save_checkpoint(str(root), {"data_position": learner.current_step()}, keep_last))
    return tags


def test_rerunning_a_stage_never_prunes_the_checkpoint_latest_names(learner, rows, tmp_path):
    root = tmp_path / "ck"
    learner.start("sft", seed=0)
    first = _save_steps(learner, rows, root, 3)
    assert sorted(p.name for p in root.glob("step_*")) == first[1:]
    learner.start("sft", seed=0)  # the stage again in the same run dir: steps count from 0 again
    tag = _save_steps(learner, rows, root, 1)[0]
    assert tag == "step_0000001" and read_latest(root)["tag"] == tag  # read_latest checks the folder exists
    assert learner.load_checkpoint(str(root))["data_position"] == 1
    again = _save_steps(learner, rows, root, 2)
    names = sorted(p.name for p in root.glob("step_*"))
    assert again[-1] in names and again[-2] in names and "step_0000001" not in names  # older by step: pruned


def _damage(folder, name):
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_falls_back_from_a_damaged_checkpoint(learner, rows, tmp_path, capsys):
    root = tmp_path / "ck"
    learner.start("sft", seed=0)
    first, second = _save_steps(learner, rows, root, 2)
    files = [f["size"] for f in json.loads((root / second / "checkpoint.json").read_text())["files"].values()]
    assert files and all(size > 0 for size in files)
    _damage(root / second, "mp_rank_00_model_states.pt")
    state = learner.load_checkpoint(str(root))
    assert state["data_position"] == 1 and learner.current_step() == 1
    out = capsys.readouterr().out
    assert f"{root / second / 'mp_rank_00_model_states.pt'}" in out and str(root / first) in out
    _damage(root / first, "rng_rank0.safetensors")
    with pytest.raises(CheckpointError, match="rng_rank0.safetensors") as error:
        learner.load_checkpoint(str(root))
    assert "mp_rank_00_model_states.pt" in str(error.value)


def test_a_missing_file_or_manifest_is_not_loaded(learner, rows, tmp_path):
    root = tmp_path / "ck"
    learner.start("sft", seed=0)
    _, second = _save_steps(learner, rows, root, 2)
    (root / second / "rng_rank0.safetensors").unlink()
    assert learner.load_checkpoint(str(root))["data_position"] == 1
    (root / "step_0000001" / "checkpoint.json").unlink()  # a save that never finished
    with pytest.raises(CheckpointError, match="checkpoint.json does not exist"):
        learner.load_checkpoint(str(root))
    assert (root / LATEST_FILE).is_file()
