"""The tiny default learns: the whole `posterrl run configs/tiny.yaml` (about 29 minutes on 2 cores).

Marked slow: .ci/run runs it after the default suite when CI time allows.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from posterrl.data.tasks import REGIME, TASKS

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3900)]


def regime_mean(row: dict, regime: str) -> float:
    return float(np.mean([row[t] for t in TASKS if REGIME[t] == regime]))


def test_experts_beat_untrained_student_keeps_up_and_rl_improves_the_gold_metric(tmp_path):
    run = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "posterrl.cli", "run", "configs/tiny.yaml", "logging.progress=false",
                           "--run-dir", str(run)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    print(json.dumps(summary["gold"], indent=1))
    check_learning(summary)


def check_learning(summary: dict) -> None:
    """The relations a finished tiny-default run must show (a function, so a run made by hand can be checked)."""
    gold = summary["gold"]
    for regime, expert in (("local", "local expert"), ("global", "global expert")):
        untrained, trained = regime_mean(gold["untrained"], regime), regime_mean(gold[expert], regime)
        # Well clear of the untrained model on its own tasks. (Not a multiple of it: with residual latents the
        # untrained model's one-input edits are the input plus noise, which already scores 0.05-0.07.)
        assert trained - untrained >= 0.04, (regime, untrained, trained)
        # Observed student/expert ratios of the tiny default: local 0.95 / 1.13, global 0.81 / 0.77 (seeds 0 / 1);
        # distilling the same experts longer or from the global expert gave 0.74-0.89 (docs/ablation.md).
        assert regime_mean(gold["student"], regime) >= 0.7 * trained, (regime, gold["student"], trained)

    # The known region survives the edit: extending and filling keep it at >= 20 dB PSNR against the input after
    # RL (the target; 23.6 / 21.6 dB and 34.7 / 33.3 dB observed, seeds 0 / 1), and better than the
    # untrained model (by 5-7 dB and 17 dB).
    psnr = summary["known_region_psnr"]
    for task in ("extending", "filling"):
        assert psnr["after RL"][task] >= 20.0, psnr
        assert psnr["after RL"][task] >= psnr["untrained"][task] + 3.0, psnr

    # The trained edit model beats the trivial edit, returning the input unchanged, on the same held-out prompts.
    # Extending and filling, student and after RL: 0.259 / 0.271 and 0.282 / 0.302 (student), 0.257 / 0.259 and
    # 0.275 / 0.299 (after RL) against 0.211 and 0.225. Rescaling after RL: 0.380 / 0.351 against 0.346, a margin
    # of 0.005 on seed 1 that machines differ by, so it may fall short by 0.01 (the old default's 0.238 fails).
    # Identity-driven beat it on seed 0 only (0.092 / 0.051 against 0.078), style-driven on neither (0.165 / 0.155
    # against 0.218): docs/ablation.md says what they would take. The mean beats it (0.206 / 0.194 against 0.181).
    unedited = gold["unedited input"]
    for task in ("extending", "filling"):
        for policy in ("student", "after RL"):
            assert gold[policy][task] > unedited[task] + 0.02, (task, policy, gold[policy], unedited)
    assert gold["after RL"]["rescaling"] >= unedited["rescaling"] - 0.01, (gold["after RL"], unedited)
    assert np.mean([gold["after RL"][t] for t in TASKS]) > np.mean([unedited[t] for t in TASKS]), (gold["after RL"],
                                                                                                 unedited)

    # RL: the learned reward of the held-out samples rises (0.85 -> 1.63, 7.48 -> 9.12), and so does the gold
    # metric, which no reward model sees, on the three composition tasks (by 0.026 / 0.019), while the mean does
    # not fall (+0.011 / +0.005): a reward that rises while the gold falls would be reward hacking. RL's gain on
    # the one-input edits is within noise here; with the gold metric as the reward it is no larger (docs/rl.md).
    table = summary["stages"]["eval"]["final_table"]
    student, after = table["student"], table["after RL"]
    assert after["reward"]["mean"] >= student["reward"]["mean"] + 0.5, (student["reward"], after["reward"])
    compositions = [t for t in TASKS if t in ("identity-driven", "layout-driven", "style-driven")]
    assert (np.mean([after["gold"][t] for t in compositions])
            > np.mean([student["gold"][t] for t in compositions])), (student["gold"], after["gold"])
    assert after["gold"]["mean"] >= student["gold"]["mean"] - 0.01, (student["gold"], after["gold"])
