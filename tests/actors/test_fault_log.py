"""The fault counters and the reward guard, in-process with numbers worked out by hand (no cluster)."""

import pytest

from actors.faults import FaultLog, RewardGuard, RunAborted, no_answer


def test_fault_log_counts_kinds_and_names_scorer_failures():
    log = FaultLog()
    log.record("rollout_chunks_redispatched", "chunk 1")
    log.record("unscored_samples", "rl epoch 3", 5)
    log.scorer_failures = {"bt": {"timeout": 4}}
    scalars = log.scalars()
    assert scalars["faults/rollout_chunks_redispatched"] == 1.0 and scalars["faults/unscored_samples"] == 5.0
    assert scalars["faults/rollout_actor_restarts"] == 0.0 and scalars["faults/scorer/bt/timeout"] == 4.0
    summary = log.summary()
    assert [e["kind"] for e in summary["events"]] == ["rollout_chunks_redispatched", "unscored_samples"]
    assert summary["events"][0]["recovered_at"] is None
    with pytest.raises(ValueError, match="unknown fault kind 'typo'"):
        log.record("typo", "x")


def test_reward_guard_trips_after_patience_epochs_over_the_fraction():
    guard = RewardGuard(max_fraction=0.5, patience=2)
    # 4 samples: 3 without a reward (0.75 > 0.5); the shadow failure on the rewarded one is not counted
    failed = [{"bt": "timed out after 1 s"}, {"bt": "timed out after 1 s"}, {"bt": "error: boom"}, {"keep": "nan"}]
    rewarded = [False, False, False, True]
    guard.observe(0, rewarded, failed)  # one epoch over: not yet
    guard.observe(1, [True, True, False, False], [{}, {}, {"bt": "x"}, {"bt": "x"}])  # exactly 0.5: resets
    guard.observe(2, rewarded, failed)
    with pytest.raises(RunAborted) as err:
        guard.observe(3, rewarded, failed)
    message = str(err.value)
    assert "75% of the samples of rl epoch 3" in message and "for 2 epochs in a row (epochs 2-3" in message
    assert "scorer 'bt': timed out after 1 s (2 samples), error: boom (1 samples)" in message
    assert "keep" not in message


def test_no_answer_names_what_it_waited_for():
    error = no_answer(["learner rank 1 (train_step)", "rollout chunk 2"], 30, "rl epoch 4")
    assert str(error).startswith("rl epoch 4: no answer for 30 s (cluster.call_timeout_s) from learner rank 1 "
                                 "(train_step); rollout chunk 2")
