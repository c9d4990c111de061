"""Turning one epoch's reward-server answers into training samples, on Experiences built directly (no Ray)."""

import numpy as np
import pytest
import torch

from learner.data import rl_batches, rl_prompts
from learner.nft import NoRetirement
from learner.scoring import score_epoch
from posterrl.data.manifest import ManifestRow
from posterrl.experience import Experience, RlSample


def experience(prompt_id: str, task: str, rewards: list, n_inputs: int = 1) -> Experience:
    """K = len(rewards) samples of one prompt scored by one scorer `bt` (None: it failed, the sample is dropped)."""
    k = len(rewards)
    reward = np.array([np.nan if x is None else x for x in rewards], dtype=np.float64)  # (K,)
    return Experience(row=ManifestRow(prompt_id, task, "make it", [], None), inputs=torch.zeros(n_inputs, 3, 4, 4),
                      samples=torch.zeros(k, 3, 4, 4), output_aspect=(1.0, 1.0), policy_version=3, reward=reward,
                      components={"bt": reward.copy()}, weights={"bt": 1.0}, reward_versions={"bt": 1},
                      failed=[{} if x is not None else {"bt": "non-finite score (nan)"} for x in rewards],
                      advantages=np.full(k, np.nan), r=np.full(k, np.nan))


def epoch(rewards: dict[str, list], tasks: dict[str, str]) -> list[Experience]:
    return [experience(pid, tasks[pid], r) for pid, r in rewards.items()]


def by_id(experiences: list[Experience]) -> dict[str, Experience]:
    return {e.prompt_id: e for e in experiences}


def test_dropped_rewards_and_lonely_groups_are_not_trained_on():
    experiences = epoch({"a": [1.0, 3.0, None], "b": [2.0, None, None], "c": [2.0, 2.0, 2.0]},
                        {"a": "filling", "b": "filling", "c": "filling"})
    scored = score_epoch(experiences, adv_max=5.0, min_group_std=None)
    groups = by_id(experiences)
    # a: two scored samples; b: one scored sample, so the whole group goes; c: three (all equal).
    assert scored.dropped_samples == 1 + 3
    assert [s.prompt_id for s in scored.samples] == ["a", "a", "c", "c", "c"]
    # batch std over the five trained rewards [1, 3, 2, 2, 2] = sqrt(0.4); a's samples are -1 and +1 from its mean
    scale = np.sqrt(0.4) + 1e-4
    assert groups["a"].advantages[:2] == pytest.approx([-1 / scale, 1 / scale])
    assert np.isnan(groups["a"].advantages[2]) and np.isnan(groups["b"].r).all()
    assert [s.r for s in scored.samples[:2]] == pytest.approx([0.5 - 0.1 / scale, 0.5 + 0.1 / scale])
    assert groups["c"].r == pytest.approx([0.5, 0.5, 0.5])
    assert scored.stats["r_mean"] == pytest.approx(0.5)
    # Each group's training samples are exactly what the epoch trains on, in group then sample order.
    assert [s.r for e in experiences for s in e.training_samples()] == [s.r for s in scored.samples]
    assert groups["b"].training_samples() == []


def test_low_variance_groups_are_filtered_but_still_reported():
    experiences = epoch({"a": [1.0, 3.0], "c": [2.0, 2.01]}, {"a": "filling", "c": "style-driven"})
    scored = score_epoch(experiences, adv_max=5.0, min_group_std=0.05)
    groups = by_id(experiences)
    assert scored.filtered_groups == ["c"] and {s.prompt_id for s in scored.samples} == {"a"}
    assert np.isfinite(groups["c"].r).all()  # scored, logged and dumped, only not trained on
    assert groups["c"].filtered and not groups["a"].filtered and groups["c"].training_samples() == []


def test_per_task_std_lets_a_quiet_task_speak():
    rewards, tasks = {"a": [0.0, 10.0], "c": [2.0, 2.2]}, {"a": "filling", "c": "style-driven"}
    batch = epoch(rewards, tasks)
    score_epoch(batch, adv_max=5.0, min_group_std=None, advantage_std="batch")
    task = epoch(rewards, tasks)
    score_epoch(task, adv_max=5.0, min_group_std=None, advantage_std="task")
    assert abs(by_id(batch)["c"].advantages[1]) < 0.1  # drowned by filling's spread
    assert by_id(task)["c"].advantages[1] == pytest.approx(1.0, abs=1e-3)  # its own spread: +-1


def test_an_epoch_without_two_scored_samples_in_any_group_trains_on_nothing():
    experiences = epoch({"a": [1.0, None], "b": [None, None]}, {"a": "filling", "b": "filling"})
    scored = score_epoch(experiences, adv_max=5.0, min_group_std=0.05)
    assert scored.samples == [] and scored.dropped_samples == 4 and scored.filtered_groups == [] and scored.stats == {}
    assert all(np.isnan(e.r).all() and np.isnan(e.advantages).all() for e in experiences)


def test_experience_from_a_rollout_group_and_its_reward_results():
    from reward_server.registry import RewardResult
    from rollout.worker import RolloutGroup

    group = RolloutGroup("p", "filling", "make it", torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4), (4.0, 3.0), 7,
                         policy_version=5)
    results = [RewardResult("p", 1.5, {"bt": 1.0, "keep": 1.0}, {"bt": 1.0, "keep": 0.5}, {"bt": 2, "keep": 1}, {}),
               RewardResult("p", None, {"keep": 0.2}, {"bt": 1.0, "keep": 0.5}, {"bt": 2, "keep": 1},
                            {"bt": "timed out after 120 s"})]
    row = ManifestRow("p", "filling", "make it", [], None)
    made = Experience.from_rollout(row, group, results)
    assert (made.prompt_id, made.task, made.instruction, made.policy_version, made.size) == ("p", "filling", "make it",
                                                                                             5, 2)
    assert made.reward[0] == 1.5 and np.isnan(made.reward[1])
    assert list(made.components) == ["bt", "keep"] and np.isnan(made.components["bt"][1])
    assert [made.sample_components(k) for k in range(2)] == [r.components for r in results]
    assert made.weights == {"bt": 1.0, "keep": 0.5} and made.reward_versions == {"bt": 2, "keep": 1}
    assert made.failed == [{}, {"bt": "timed out after 120 s"}]
    assert np.isnan(made.r).all() and np.isnan(made.advantages).all() and not made.filtered
    assert made.training_samples() == []  # not scored yet
    assert [im.size for im in made.output_images()] == [im.size for im in group.output_images()]


def test_no_retirement_retires_nothing_and_checkpoints_nothing():
    retirement = NoRetirement()
    assert retirement.observe({"a": 10.0}) == [] and retirement.retired == frozenset()
    assert retirement.state() is None
    retirement.load(None)


def test_rl_prompts_are_balanced_over_tasks_and_skip_retired():
    rows = [ManifestRow(f"{t}-{i}", t, "", [], None)
            for t in ("filling", "extending", "style-driven") for i in range(5)]
    chosen = rl_prompts(rows, 6, seed=0, epoch=0)
    assert sorted(r.task for r in chosen) == sorted(["filling", "extending", "style-driven"] * 2)
    assert rl_prompts(rows, 6, seed=0, epoch=0) == chosen and rl_prompts(rows, 6, seed=0, epoch=1) != chosen
    retired = {f"filling-{i}" for i in range(5)}
    assert all(r.task != "filling" for r in rl_prompts(rows, 6, seed=0, epoch=0, retired=retired))


def test_rl_batches_are_full_and_share_their_number_of_inputs():
    # 4 with 1 input, 3 with 2
    samples = [RlSample(f"p{i}", "filling", "", torch.zeros(1 + (i % 2), 3, 4, 4), torch.zeros(3, 4, 4), 0.5)
               for i in range(7)]
    batches = rl_batches(samples, batch_size=2, seed=0)
    assert all(len(b) == 2 and len({s.inputs.shape[0] for s in b}) == 1 for b in batches)
    assert {id(s) for b in batches for s in b} == {id(s) for s in samples}  # everything is trained on
    assert len(batches) == 2 + 2  # 4 -> 2 batches, 3 -> 2 batches (one topped up)
