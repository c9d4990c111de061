"""ZeRO-3 with LoRA on a released architecture: 2 learner ranks through real Ray and real DeepSpeed (gloo) train
the tiny FLUX.1 Kontext policy as ZeRO-2 does, with the frozen transformer base sharded over the ranks.

theta_old, the reference and the experts are copied into the sharded adapters for their forwards
(learner/tasks/base.py velocity_with); the soft update, the weights the rollouts get, exports and checkpoints
read the adapters gathered. Each is compared with the same steps under ZeRO-2."""

import json

import pytest
import torch

from actors.learner_group import LearnerGroup
from posterrl.config import load_config
from posterrl.experience import RlSample
from posterrl.models import tiny_pipelines
from posterrl.policies import build_policy, load_policy
from posterrl.policy import quiet_model_libraries

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    quiet_model_libraries()
    return tiny_pipelines.make_tiny("flux_kontext", tmp_path_factory.mktemp("z3") / "flux_kontext", seed=0)


def config_for(kontext_dir, stage: int):
    return load_config("configs/flux_kontext_tiny.yaml", [
        f"model.pretrained_path={kontext_dir}", f"deepspeed.zero_stage={stage}", "learner.num_ranks=2",
        "learner.micro_batch_size=1", "learner.warmup_steps=0", "rl.batch_size=4", "rl.kl_coef=0.01",
        "rl.lr=1e-2"])


def rl_batch(latent_shape, seed: int) -> list[RlSample]:
    g = torch.Generator().manual_seed(seed)
    return [RlSample(f"p{i // 2}", "filling", "fill the gap", torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
                     torch.randn(*latent_shape, generator=g), float(i % 2)) for i in range(4)]


def nft_run(config, tmp_path, name: str) -> dict:
    """Two nft steps, a soft update, a checkpoint, a third step and the export, on 2 ranks."""
    policy = build_policy(config.model, config.rollout)
    torch.manual_seed(0)
    start_state = {k: v + 0.05 * torch.randn_like(v) for k, v in policy.policy_state().items()}
    group = LearnerGroup(config)
    try:
        group.start("nft", seed=0, init_state=start_state)
        losses = [group.train_step(rl_batch(policy.latent_shape, step)).loss for step in range(2)]
        group.call("update_sampling_policy")
        result = {"start": start_state, "losses": losses, "theta": group.call("policy_state"),
                  "old": group.call("sampling_weights"), "probe": group.call("sampling_probe")}
        group.call("save_checkpoint", str(tmp_path / f"ck_{name}"), {"epoch": 1}, 2)
        result["after_checkpoint"] = group.train_step(rl_batch(policy.latent_shape, 2)).loss
        group.call("export", str(tmp_path / f"export_{name}"))
    finally:
        group.shutdown()
    resumed = LearnerGroup(config)
    try:
        resumed.start("nft", seed=0, init_state=start_state)
        resumed.call("load_checkpoint", str(tmp_path / f"ck_{name}"))
        result["resumed"] = resumed.train_step(rl_batch(policy.latent_shape, 2)).loss
    finally:
        resumed.shutdown()
    return result


def test_zero3_trains_the_sharded_kontext_policy_as_zero2_does(ray_cluster, kontext_dir, tmp_path):
    zero2 = nft_run(config_for(kontext_dir, 2), tmp_path, "zero2")
    zero3 = nft_run(config_for(kontext_dir, 3), tmp_path, "zero3")
    assert all(loss == loss for loss in zero3["losses"])
    assert zero3["losses"] == pytest.approx(zero2["losses"], rel=1e-5)
    for state2, state3 in zip(zero2["theta"] + zero2["old"], zero3["theta"] + zero3["old"], strict=True):
        assert set(state3) == set(state2)  # every adapter, whole on each rank (not a shard)
        for key in state2:
            assert torch.as_tensor(state3[key]).shape == torch.as_tensor(state2[key]).shape, key
            assert torch.allclose(torch.as_tensor(state3[key]), torch.as_tensor(state2[key]), atol=1e-5), key
    # the steps moved theta (LoRA's B starts at zero: it trains), and both ranks hold the same theta_old
    moved = [k for k in zero3["start"] if not torch.allclose(zero3["theta"][0][k], zero3["start"][k], atol=1e-6)]
    assert len(moved) >= len(zero3["start"]) // 2
    assert all(torch.equal(torch.as_tensor(zero3["old"][0][k]), torch.as_tensor(zero3["old"][1][k]))
               for k in zero3["old"][0])
    assert torch.allclose(zero3["probe"][0], zero2["probe"][0], atol=1e-4)
    # a checkpoint taken under ZeRO-3 resumes to the same next step
    assert zero3["resumed"] == pytest.approx(zero3["after_checkpoint"], rel=1e-6)
    assert zero3["after_checkpoint"] == pytest.approx(zero2["after_checkpoint"], rel=1e-5)
    # the export (theta_old's adapters, gathered) loads into a fresh policy with theta_old's values
    exported = load_policy(tmp_path / "export_zero3").policy_state()
    for key, value in zero3["old"][0].items():
        assert torch.allclose(exported[key].float(), torch.as_tensor(value), atol=1e-6), key


@pytest.mark.slow
def test_the_pipeline_runs_every_stage_under_zero3(kontext_dir, tmp_path):
    """The real CLI, every stage, ZeRO-3 on 2 ranks (ranks that answer for the group, a scoring pass or theta's
    weights, are joined by the other rank: a sharded forward is a collective). 42 s here."""
    from test_pipeline_run import EXPORTS, OVERRIDES, posterrl

    run_dir = tmp_path / "run"
    posterrl("run", "configs/flux_kontext_tiny.yaml", *OVERRIDES, f"model.pretrained_path={kontext_dir}",
             "deepspeed.zero_stage=3", "--run-dir", str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["completed"]) >= {"data", "sft", "distill", "reward", "rl", "eval"}
    assert all(v == v for v in summary["gold"]["after RL"].values())
    assert [h["epoch"] for h in summary["stages"]["rl"]["history"]] == [1, 2]
    start = load_policy(run_dir / "checkpoints" / "distill").policy_state()
    for export in EXPORTS:
        state = load_policy(run_dir / "checkpoints" / export).policy_state()
        assert set(state) == set(start) and all(v.numel() > 0 for v in state.values()), export
    rl_state = load_policy(run_dir / "checkpoints" / "rl").policy_state()
    assert any(not torch.equal(rl_state[k], start[k]) for k in start)  # rl trained the adapters
