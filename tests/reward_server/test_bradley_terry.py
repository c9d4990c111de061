"""The conv Bradley-Terry reward model: it learns to rank, saves, loads, and fails loudly on bad files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from learner.bt_loss import bradley_terry_loss
from posterrl.config import RewardModelConfig
from posterrl.data.tasks import TASKS, build_samples
from posterrl.models.reward_model import (
    MODEL_SPEC_FILE,
    WEIGHTS_FILE,
    build_reward_model,
    load_reward_model,
    pair_sides,
    reward_model_spec,
    save_reward_model,
)
from posterrl.models.samples import EditSample, PreferencePair
from reward_server.bradley_terry import BradleyTerryScorer

SPEC = reward_model_spec(RewardModelConfig(channels=8, image_size=32))


def degraded(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A worse edit: blurred and noised, or the poster shifted."""
    if rng.random() < 0.5:
        array = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
        array += rng.normal(0, 25, array.shape)
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return image.transform(image.size, Image.AFFINE, (1, 0, image.width // 4, 0, 1, 0), fillcolor=(128, 128, 128))


def target_pairs(start: int, n: int, seed: int) -> list[PreferencePair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(start, start + n):
        for s in build_samples(index, 0, 32, TASKS):
            pairs.append(PreferencePair(s.id, s.task, s.instruction, s.inputs, s.target, degraded(s.target, rng),
                                        source="policy", gold_margin=1.0))
    return pairs


def rewards(model, samples):
    with torch.no_grad():
        return model(**model.prepare(samples))


def test_prepare_and_forward_shapes():
    model = build_reward_model(SPEC)
    samples = [EditSample(s.id, s.task, s.instruction, s.inputs, s.target) for s in build_samples(0, 0, 32, TASKS)]
    prepared = model.prepare(samples)
    assert prepared["output"].shape == (6, 3, 32, 32) and prepared["inputs"].shape == (6, 3, 3, 32, 32)
    assert prepared["input_mask"].sum(1).tolist() == [len(s.inputs) for s in samples]
    out = rewards(model, samples)
    assert out.shape == (6,) and torch.isfinite(out).all()


def test_difference_channels_change_the_encoders_and_old_specs_load_without_them(tmp_path):
    spec = reward_model_spec(RewardModelConfig(channels=8, image_size=32, difference_channels=True))
    model = build_reward_model(spec).eval()
    assert model.output_encoder[0][0].in_channels == 6 and model.pair_encoder[0][0].in_channels == 12
    samples = [EditSample(s.id, s.task, s.instruction, s.inputs, s.target) for s in build_samples(0, 0, 32, TASKS)]
    out = rewards(model, samples)
    assert out.shape == (6,) and torch.isfinite(out).all()
    save_reward_model(model, tmp_path / "rm")
    assert torch.equal(rewards(load_reward_model(tmp_path / "rm").eval(), samples), out)
    # a model saved before the option existed has no key in its spec: plain channels
    old_spec = {k: v for k, v in SPEC.items() if k != "difference_channels"}
    assert build_reward_model(old_spec).pair_encoder[0][0].in_channels == 6


def test_absent_input_slots_are_skipped_and_change_nothing():
    model = build_reward_model(SPEC).eval()
    samples = [EditSample(s.id, s.task, s.instruction, s.inputs, s.target) for s in build_samples(0, 0, 32, TASKS)]
    prepared = model.prepare(samples)
    assert 0 < prepared["input_mask"].sum() < prepared["input_mask"].numel()  # the six tasks mix 1..3 inputs
    with torch.no_grad():
        out = model(**prepared)
        # reference: every present slot encoded one sample at a time, averaged; absent slots never looked at
        f_out = model.output_encoder(prepared["output"])
        expected = []
        for i, sample in enumerate(samples):
            n = len(sample.inputs)
            stacked = torch.cat([prepared["output"][i].expand(n, -1, -1, -1), prepared["inputs"][i, :n]], dim=1)
            f_inputs = model.pair_encoder(stacked).mean(0)
            features = torch.cat([f_out[i], f_inputs, model.task_embedding(prepared["task"][i])])
            expected.append(model.head(features).squeeze(-1))
        torch.testing.assert_close(out, torch.stack(expected), rtol=1e-4, atol=1e-5)
        prepared["inputs"][prepared["input_mask"] == 0] = float("nan")  # absent slots are never read: NaN stays out
        torch.testing.assert_close(model(**prepared), out)


@pytest.mark.parametrize("difference_channels", [False, True])
def test_conv_model_learns_to_rank_held_out_pairs(difference_channels):
    torch.manual_seed(0)
    model = build_reward_model({**SPEC, "difference_channels": difference_channels})
    train, held_out = target_pairs(0, 12, seed=1), target_pairs(100, 4, seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def accuracy(pairs):
        chosen, rejected, _ = pair_sides(pairs)
        return float((rewards(model, chosen) > rewards(model, rejected)).float().mean())

    before = accuracy(held_out)
    rng = np.random.default_rng(0)
    for _ in range(120):
        batch = [train[i] for i in rng.choice(len(train), 16, replace=False)]
        chosen, rejected, tie = pair_sides(batch)
        loss, _ = bradley_terry_loss(model(**model.prepare(chosen)), model(**model.prepare(rejected)), tie)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy(held_out)
    assert after >= 0.85 and after > before


def test_save_load_round_trip_and_scorer(tmp_path):
    model = build_reward_model({**SPEC, "seed": 3}).eval()
    save_reward_model(model, tmp_path / "rm")
    save_reward_model(model, tmp_path / "rm")  # overwriting a saved model is allowed
    loaded = load_reward_model(tmp_path / "rm").eval()
    samples = [EditSample(s.id, s.task, s.instruction, s.inputs, s.target) for s in build_samples(1, 0, 32, TASKS)]
    assert torch.equal(rewards(model, samples), rewards(loaded, samples))
    scorer = BradleyTerryScorer(tmp_path / "rm", batch_size=4)
    assert isinstance(scorer.forward, torch.jit.ScriptModule)  # served traced: batches of 4 and 2 below vs eager
    batch = scorer.score(samples)
    assert batch.scores.dtype == np.float64 and batch.scores.shape == (6,)
    np.testing.assert_allclose(batch.scores, rewards(model, samples).double().numpy(), rtol=1e-6)


def test_bad_directories_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_reward_model(tmp_path / "absent")
    save_reward_model(build_reward_model(SPEC), tmp_path / "rm")
    (tmp_path / "rm" / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable weights"):
        load_reward_model(tmp_path / "rm")
    save_reward_model(build_reward_model(SPEC), tmp_path / "rm")
    (tmp_path / "rm" / MODEL_SPEC_FILE).write_text(json.dumps({**SPEC, "channels": 16}))
    with pytest.raises(ValueError, match="do not fit the spec"):
        load_reward_model(tmp_path / "rm")
    (tmp_path / "rm" / MODEL_SPEC_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {MODEL_SPEC_FILE}"):
        load_reward_model(tmp_path / "rm")


def test_augmentation_transforms_both_sides_of_a_pair_alike():
    model = build_reward_model(SPEC)
    channel_values = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32)  # left to right, so a flip is visible
    chosen = {"output": (channel_values + ramp).expand(8, 3, 32, 32).clone(),
              "inputs": (channel_values + ramp).unsqueeze(1).expand(8, 2, 3, 32, 32).clone()}
    rejected = {k: v.clone() * 2 for k, v in chosen.items()}
    model.augment_pairs(chosen, rejected, torch.Generator().manual_seed(0))
    flips = chosen["output"][:, 0, 0, 0] > chosen["output"][:, 0, 0, -1]
    assert 0 < int(flips.sum()) < 8  # some pairs flipped, some not
    order = chosen["output"].mean((2, 3))  # (B, 3): the channel permutation of each pair
    assert not torch.equal(order, order[:1].expand_as(order))  # permutations differ across pairs
    for b in range(8):
        assert torch.allclose(rejected["output"][b], 2 * chosen["output"][b])  # same transform on both sides
        assert torch.allclose(chosen["inputs"][b, 1], chosen["output"][b])  # and on the inputs
