"""The VLM backbone of the Bradley-Terry reward model at tiny size: forward, LoRA, learning, save/load."""

import pytest
import torch

from learner.bt_loss import bradley_terry_loss
from posterrl.config import BradleyTerryConfig
from posterrl.data.tasks import TASKS, build_samples
from reward_server.bradley_terry import build_reward_model, load_reward_model, reward_model_spec, save_reward_model
from reward_server.tiny_vlm import build_tiny_qwen2_vl
from reward_server.types import EditSample


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("rm_vlm") / "tiny")


def spec(vlm_dir, lora_rank):
    return reward_model_spec(BradleyTerryConfig(backbone="vlm", vlm_path=str(vlm_dir), lora_rank=lora_rank))


def edits(index=0):
    return [EditSample(s.id, s.task, s.instruction, s.inputs, s.target) for s in build_samples(index, 0, 64, TASKS)]


def test_forward_over_tasks_with_one_to_three_inputs(vlm_dir):
    model = build_reward_model(spec(vlm_dir, 0))
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
        loss, _ = bradley_terry_loss(model(**model.prepare(good)), model(**model.prepare(bad)), torch.zeros(2, dtype=torch.bool))
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
