"""The tiny default learns: the whole `posterrl run configs/tiny.yaml` (about 30 minutes on 2 cores).

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
    gold = summary["gold"]
    print(json.dumps(gold, indent=1))
    for regime, expert in (("local", "local expert"), ("global", "global expert")):
        untrained, trained = regime_mean(gold["untrained"], regime), regime_mean(gold[expert], regime)
        # A wide margin on its own tasks: several times the untrained score and well clear of it.
        assert trained >= 3 * untrained and trained - untrained >= 0.05, (regime, untrained, trained)
        # Observed student/expert ratios: 0.94 to 1.41 across runs; runs of the tiny default are not
        # bitwise reproducible on this machine any more (cause not pinned down yet; README "Results").
        assert regime_mean(gold["student"], regime) >= 0.9 * trained, (regime, gold["student"], trained)

    # RL: the held-out gold metric beats the distilled student overall and on at least 5 of the 6 tasks,
    # while the learned reward of the same samples rises (a reward that rises alone would be hacking).
    table = summary["stages"]["eval"]["final_table"]
    student, after = table["student"], table["after RL"]
    assert after["gold"]["mean"] > student["gold"]["mean"], (student["gold"], after["gold"])
    better = [t for t in TASKS if after["gold"][t] > student["gold"][t]]
    assert len(better) >= 5, (better, student["gold"], after["gold"])
    assert after["reward"]["mean"] > student["reward"]["mean"], (student["reward"], after["reward"])
