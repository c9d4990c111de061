"""Turning one epoch's reward-server answers into training samples (no cluster needed)."""

import numpy as np
import pytest
import torch

from actors.rl import EpochRollouts, score_epoch
from learner.data import rl_batches, rl_prompts
from posterrl.data.manifest import ManifestRow
from reward_server.registry import RewardResult
from rollout.worker import RolloutGroup


def group(prompt_id: str, task: str, k: int, n_inputs: int = 1) -> RolloutGroup:
    return RolloutGroup(prompt_id, task, "make it", torch.zeros(k, 3, 4, 4), torch.zeros(n_inputs, 3, 4, 4),
                        (1.0, 1.0), 0, policy_version=3)


def result(reward):
    return RewardResult("p", reward, {"bt": reward} if reward is not None else {}, {"bt": 1.0}, {"bt": 1}, {})


def rollouts(rewards: dict[str, list], tasks: dict[str, str]) -> EpochRollouts:
    rows = [ManifestRow(pid, tasks[pid], "make it", [], None) for pid in rewards]
    groups = [group(pid, tasks[pid], len(r)) for pid, r in rewards.items()]
    results = [[result(x) for x in r] for r in rewards.values()]
    return EpochRollouts(0, rows, groups, results, 1.0, 0.1)


def test_dropped_rewards_and_lonely_groups_are_not_trained_on():
    epoch = rollouts({"a": [1.0, 3.0, None], "b": [2.0, None, None], "c": [2.0, 2.0, 2.0]},
                     {"a": "filling", "b": "filling", "c": "filling"})
    scored = score_epoch(epoch, adv_max=5.0, min_group_std=None)
    # a: two scored samples; b: one scored sample, so the whole group goes; c: three (all equal).
    assert scored.dropped_samples == 1 + 3
    assert [s.prompt_id for s in scored.samples] == ["a", "a", "c", "c", "c"]
    # batch std over the five trained rewards [1, 3, 2, 2, 2] = sqrt(0.4); a's samples are -1 and +1 from its mean
    scale = np.sqrt(0.4) + 1e-4
    assert scored.advantages["a"][:2] == pytest.approx([-1 / scale, 1 / scale])
    assert np.isnan(scored.advantages["a"][2]) and np.isnan(scored.r["b"]).all()
    assert [s.r for s in scored.samples[:2]] == pytest.approx([0.5 - 0.1 / scale, 0.5 + 0.1 / scale])
    assert scored.r["c"] == pytest.approx([0.5, 0.5, 0.5])


def test_low_variance_groups_are_filtered_but_still_reported():
    epoch = rollouts({"a": [1.0, 3.0], "c": [2.0, 2.01]}, {"a": "filling", "c": "style-driven"})
    scored = score_epoch(epoch, adv_max=5.0, min_group_std=0.05)
    assert scored.filtered_groups == ["c"] and {s.prompt_id for s in scored.samples} == {"a"}
    assert np.isfinite(scored.r["c"]).all()  # scored, logged and dumped, only not trained on


def test_per_task_std_lets_a_quiet_task_speak():
    epoch = rollouts({"a": [0.0, 10.0], "c": [2.0, 2.2]}, {"a": "filling", "c": "style-driven"})
    batch = score_epoch(epoch, adv_max=5.0, min_group_std=None, advantage_std="batch")
    task = score_epoch(epoch, adv_max=5.0, min_group_std=None, advantage_std="task")
    assert abs(batch.advantages["c"][1]) < 0.1  # drowned by filling's spread
    assert task.advantages["c"][1] == pytest.approx(1.0, abs=1e-3)  # its own spread: +-1


def test_rl_prompts_are_balanced_over_tasks_and_skip_retired():
    rows = [ManifestRow(f"{t}-{i}", t, "", [], None) for t in ("filling", "extending", "style-driven") for i in range(5)]
    chosen = rl_prompts(rows, 6, seed=0, epoch=0)
    assert sorted(r.task for r in chosen) == sorted(["filling", "extending", "style-driven"] * 2)
    assert rl_prompts(rows, 6, seed=0, epoch=0) == chosen and rl_prompts(rows, 6, seed=0, epoch=1) != chosen
    retired = {f"filling-{i}" for i in range(5)}
    assert all(r.task != "filling" for r in rl_prompts(rows, 6, seed=0, epoch=0, retired=retired))


def test_rl_batches_are_full_and_share_their_number_of_inputs():
    samples = [group(f"p{i}", "filling", 1, n_inputs=1 + (i % 2)) for i in range(7)]  # 4 with 1 input, 3 with 2
    batches = rl_batches(samples, batch_size=2, seed=0)
    assert all(len(b) == 2 and len({s.inputs.shape[0] for s in b}) == 1 for b in batches)
    assert {id(s) for b in batches for s in b} == {id(s) for s in samples}  # everything is trained on
    assert len(batches) == 2 + 2  # 4 -> 2 batches, 3 -> 2 batches (one topped up)


def test_output_size_is_the_targets_else_the_aspect_at_the_first_inputs_long_side(tmp_path):
    from PIL import Image

    from actors.rollout_group import output_size

    Image.new("RGB", (48, 64)).save(tmp_path / "target.png")
    Image.new("RGB", (60, 40)).save(tmp_path / "input.png")
    wide = RolloutGroup("p", "rescaling", "", torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), (4.0, 3.0), 0, 0)
    tall = RolloutGroup("p", "rescaling", "", torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), (3.0, 4.0), 0, 0)
    with_target = ManifestRow("p", "rescaling", "", [tmp_path / "input.png"], tmp_path / "target.png")
    without = ManifestRow("p", "rescaling", "", [tmp_path / "input.png"], None)
    assert output_size(with_target, wide) == (48, 64)
    assert output_size(without, wide) == (60, 45) and output_size(without, tall) == (45, 60)
