"""The tiny default learns: the whole `posterrl run configs/tiny.yaml` (about 24 minutes on 2 cores).

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
        # Observed student/expert ratios of the tiny default: local 1.00 / 0.96, global 0.84 / 0.80 (seeds 0 / 1);
        # distilling the same experts longer or from the global expert gave 0.74-0.89 (docs/ablation.md).
        assert regime_mean(gold["student"], regime) >= 0.7 * trained, (regime, gold["student"], trained)

    # The known region survives the edit: filling keeps what is outside its hole at >= 20 dB PSNR against the
    # input (the target; 21.8 / 22.3 dB observed), and both tasks keep it better than the untrained
    # model (extending +2.8 / +2.6 dB, filling +6 / +7 dB).
    psnr = summary["known_region_psnr"]
    assert psnr["after RL"]["filling"] >= 20.0, psnr
    for task in ("extending", "filling"):
        assert psnr["after RL"][task] >= psnr["untrained"][task] + 2.0, psnr

    # The trained edit model beats the trivial edit, returning the input unchanged, on the same held-out prompts,
    # for extending and filling (student 0.229 / 0.250 and 0.232 / 0.259 against 0.211 / 0.225, seeds 0 / 1).
    # After RL they still beat it, by 0.008 / 0.017 and 0.013 / 0.027: less than machines differ by (docs), so
    # that is not asserted. Rescaling (0.24 against 0.35) and style-driven (0.16 against 0.22) do not beat it
    # yet: docs/ablation.md says what they would take.
    for task in ("extending", "filling"):
        assert gold["student"][task] > gold["unedited input"][task] + 0.01, (task, gold["student"],
                                                                             gold["unedited input"])

    # RL: the learned reward of the held-out samples rises (0.37 -> 1.77, 5.06 -> 6.48), and so does the gold
    # metric, which no reward model sees, on the three composition tasks (by 0.012 / 0.016), while the mean does
    # not fall (+0.002 / +0.007): a reward that rises while the gold falls would be reward hacking. RL's gain on
    # the one-input edits is within noise here; with the gold metric as the reward it is no larger (docs/rl.md).
    table = summary["stages"]["eval"]["final_table"]
    student, after = table["student"], table["after RL"]
    assert after["reward"]["mean"] >= student["reward"]["mean"] + 0.5, (student["reward"], after["reward"])
    compositions = [t for t in TASKS if t in ("identity-driven", "layout-driven", "style-driven")]
    assert (np.mean([after["gold"][t] for t in compositions])
            > np.mean([student["gold"][t] for t in compositions])), (student["gold"], after["gold"])
    assert after["gold"]["mean"] >= student["gold"]["mean"] - 0.01, (student["gold"], after["gold"])
