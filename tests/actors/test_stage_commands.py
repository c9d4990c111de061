"""`posterrl sft` and `posterrl distill` run one stage each, and `--resume` picks a killed stage up at
its last DeepSpeed checkpoint (real Ray, real DeepSpeed, real CLI)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SMALL = ["data.n_train=2", "data.n_val=1", "data.chunks=1", "rollout.eval_per_task=1", "rollout.num_steps=2",
         "sft.batch_size=4", "distill.batch_size=4", "learner.micro_batch_size=2", "sft.eval_every=100",
         "distill.eval_every=100", "logging.progress=false"]


def posterrl(*args):
    return subprocess.run([sys.executable, "-m", "posterrl.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # 70 s; the default suite runs the stages in one `posterrl run` (test_run_cli.py)
def test_sft_then_distill_as_separate_commands(tmp_path):
    run = tmp_path / "run"
    proc = posterrl("sft", "configs/tiny.yaml", *SMALL, "sft.steps=2", "sft.local_steps=null", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] == ["data", "sft"]
    assert list(summary["gold"]) == ["unedited input", "untrained", "local expert", "global expert"]

    proc = posterrl("distill", "configs/tiny.yaml", *SMALL, "distill.steps=2", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] == ["data", "sft", "distill"]
    assert "student" in summary["gold"]
    assert summary["global_step"] == 2 + 2 + 2  # two experts, then the student


def test_distill_without_experts_says_what_is_missing(tmp_path):
    proc = posterrl("distill", "configs/tiny.yaml", *SMALL, "--run-dir", str(tmp_path / "empty"))
    assert proc.returncode == 2
    assert "distill needs the sft experts" in proc.stdout
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


@pytest.mark.slow  # 80-90 s; the default suite resumes in test_rl.py (a killed run) and test_learner_group.py
def test_resume_continues_a_killed_stage_from_its_checkpoint(tmp_path, killed_when):
    run = tmp_path / "run"
    args = ["sft", "configs/tiny.yaml", *SMALL, "sft.steps=16", "sft.local_steps=null", "sft.checkpoint_every=4",
            "--run-dir", str(run)]
    latest = run / "checkpoints" / "deepspeed" / "sft_local" / "latest.json"
    killed_when(args, latest)
    step = json.loads(latest.read_text())["step"]
    assert step >= 4

    proc = posterrl(*args, "--resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"sft_local: resumed from {latest.parent} at step {step}" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["sft"]["local"]["steps"] == 16
    assert json.loads(latest.read_text())["step"] == 16
