"""The VLM backbone of the Bradley-Terry reward model at tiny size, on a tiny Qwen2-VL and a tiny Qwen2.5-VL:
forward, LoRA, learning, save/load."""

import numpy as np
import pytest
import torch

from learner.bt_loss import bradley_terry_loss
from posterrl.batch import on_device
from posterrl.config import RewardModelConfig
from posterrl.data.tasks import TASKS, build_samples
from posterrl.models.reward_model import build_reward_model, load_reward_model, reward_model_spec, save_reward_model
from posterrl.models.samples import EditSample
from posterrl.models.tiny_vlm import FAMILIES, build_tiny_vlm
from reward_server.bradley_terry import BradleyTerryScorer
from reward_server.types import scorer_dtype


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm_dir(request, tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("rm_vlm") / request.param, request.param)


def spec(vlm_dir, lora_rank):
    return reward_model_spec(RewardModelConfig(backbone="vlm", vlm_path=str(vlm_dir), lora_rank=lora_rank))


def edits(index=0):
    return [EditSample(s.id, s.task, s.instruction, s.inputs, s.target) for s in build_samples(index, 0, 64, TASKS)]


def test_forward_over_tasks_with_one_to_three_inputs(vlm_dir):
    model = build_reward_model(spec(vlm_dir, 0))
    assert all(p.requires_grad for p in model.parameters())  # no LoRA: the whole backbone trains
    samples = edits()
    assert {len(s.inputs) for s in samples} >= {1, 2}
    with torch.no_grad():
        rewards = model(**model.prepare(samples))
    assert rewards.shape == (6,) and torch.isfinite(rewards).all()


def test_lora_trains_adapters_and_head_only_and_learns_a_pair(vlm_dir):
    model = build_reward_model(spec(vlm_dir, 4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    good, bad = edits(0)[:2], edits(1)[:2]
    bad = [EditSample(g.prompt_id, g.task, g.instruction, g.inputs, b.output) for g, b in zip(good, bad)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def margin():
        with torch.no_grad():
            return float((model(**model.prepare(good)) - model(**model.prepare(bad))).mean())

    before = margin()
    for _ in range(15):
        loss, _ = bradley_terry_loss(model(**model.prepare(good)), model(**model.prepare(bad)),
                                     torch.zeros(2, dtype=torch.bool))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert margin() > before + 0.1
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(n.endswith("lora_b") and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_save_and_load_give_identical_rewards(vlm_dir, tmp_path):
    model = build_reward_model(spec(vlm_dir, 2)).eval()
    with torch.no_grad():
        model.head[-1].bias.fill_(0.3)
    save_reward_model(model, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm").eval()
    samples = edits()[:3]
    with torch.no_grad():
        assert torch.allclose(model(**model.prepare(samples)), loaded(**loaded.prepare(samples)))


def test_scorer_serves_the_saved_model_and_its_gpu_precision_stays_close(vlm_dir, tmp_path):
    model = build_reward_model(spec(vlm_dir, 0)).eval()
    save_reward_model(model, tmp_path / "rm")
    samples = edits()
    with torch.no_grad():
        eager = model(**model.prepare(samples))
    scorer = BradleyTerryScorer(tmp_path / "rm", batch_size=4, device=torch.device("cpu"))
    assert scorer.dtype == torch.float32 and scorer_dtype(torch.device("cuda", 0)) == torch.bfloat16
    np.testing.assert_allclose(scorer.score(samples).scores, eager.double().numpy(), rtol=1e-5, atol=1e-6)
    # The precision a GPU reward server uses (bf16), run on CPU through the same input cast.
    low = model.to(torch.bfloat16)
    with torch.no_grad():
        rewards = low(**on_device(low.prepare(samples), torch.device("cpu"), torch.bfloat16)).float()
    spread = float(eager.max() - eager.min())
    assert torch.isfinite(rewards).all(), rewards
    assert float((rewards - eager).abs().max()) < 0.05 * spread + 0.005, (rewards, eager)
