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
        # Observed student/expert ratios of the tiny default: local 1.07 / 1.33, global 0.90 / 0.78 (seeds 0 / 1);
        # distilling the same experts longer or from the global expert gave 0.74-0.89 (docs/ablation.md).
        assert regime_mean(gold["student"], regime) >= 0.7 * trained, (regime, gold["student"], trained)

    # The known region survives the edit: filling keeps what is outside its hole at >= 20 dB PSNR against the
    # input (the target; 21.5 dB observed), and both tasks keep it far better than the untrained model.
    psnr = summary["known_region_psnr"]
    assert psnr["after RL"]["filling"] >= 20.0, psnr
    for task in ("extending", "filling"):
        assert psnr["after RL"][task] >= psnr["untrained"][task] + 3.0, psnr

    # Extending and filling beat the trivial edit, returning the input unchanged, on the same held-out prompts
    # (seed 0: student 0.229 / 0.250 against 0.211 / 0.225). Rescaling (0.24 against 0.35) and style-driven
    # (0.16 against 0.22) do not yet: docs/ablation.md says what they would take.
    for task in ("extending", "filling"):
        assert gold["after RL"][task] > gold["unedited input"][task], (task, gold["after RL"], gold["unedited input"])

    # RL: the held-out gold metric beats the distilled student overall and on at least 3 of the 6 tasks (seed 0: 6;
    # seed 1: 3, the others down by <= 0.003), while the learned reward of the same samples rises (a reward that
    # rises alone would be hacking).
    table = summary["stages"]["eval"]["final_table"]
    student, after = table["student"], table["after RL"]
    assert after["gold"]["mean"] > student["gold"]["mean"], (student["gold"], after["gold"])
    better = [t for t in TASKS if after["gold"][t] > student["gold"][t]]
    assert len(better) >= 3, (better, student["gold"], after["gold"])
    assert after["reward"]["mean"] > student["reward"]["mean"], (student["reward"], after["reward"])
