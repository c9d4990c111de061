"""Faults through the real CLI, real Ray and real DeepSpeed: a rollout actor SIGKILLed mid-epoch, a learner
rank SIGKILLed, Ctrl-C, and a scorer that fails every batch (the reward guard). The run survives what it can
(nothing lost, nothing taken twice, every recovery counted) and stops cleanly, naming the fault, otherwise."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from posterrl.config import load_config
from posterrl.models.reward_model import build_reward_model, reward_model_spec, save_reward_model
from posterrl.policy import EditPolicy

pytestmark = pytest.mark.integration

SMALL = ["data.n_train=2", "data.n_val=1", "data.chunks=2", "rollout.eval_per_task=1", "rollout.num_steps=2",
         "rollout.group_size=2", "learner.micro_batch_size=2", "logging.progress=false",
         "rl.prompts_per_epoch=6", "rl.batch_size=4", "rl.dump_every=1", "rl.log_images_every=100",
         "rl.eval_every=100", "stages=[data,rl]", "reward.scorers=[{name: keep, kind: preservation}]"]
PROMPTS, K = 6, 2
# The runs a fault test compares with an unharmed one: 2 learner ranks, a checkpoint every 2 epochs.
COMPARED = ["rl.epochs=4", "rl.checkpoint_every=2", "learner.num_ranks=2"]


def start_run(run: Path, *overrides: str, resume: bool = False) -> subprocess.Popen:
    """`posterrl run` in a session of its own (so its processes can be found, signalled and counted)."""
    if not (run / "checkpoints" / "distill").exists():
        config = load_config("configs/tiny.yaml", [*SMALL, *overrides])
        EditPolicy.from_config(config.model, config.rollout).save_pretrained(run / "checkpoints" / "distill")
    args = [sys.executable, "-m", "posterrl.cli", "run", "configs/tiny.yaml", *SMALL, *overrides,
            "--run-dir", str(run), *(["--resume"] if resume else [])]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def session_processes(session: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return found


def find_process(session: int, title: str, timeout_s: float = 300) -> psutil.Process:
    """A process of the session whose title (Ray sets it to ray::<Class>.<method> while a method runs)
    starts with `title`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for process in session_processes(session):
            try:
                if " ".join(process.cmdline()).startswith(title):
                    return process
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        time.sleep(0.05)
    raise AssertionError(f"no process titled {title!r} in session {session} after {timeout_s} s")


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} did not appear in {timeout_s} s"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout_s: float = 900) -> tuple[int, str, float]:
    """Exit status, output and seconds to exit; then no process of the run's session may be left."""
    began = time.time()
    out, _ = proc.communicate(timeout=timeout_s)
    took = time.time() - began
    deadline = time.time() + 30  # Ray's processes end right after the driver's shutdown; give them a moment
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    left = [" ".join(p.cmdline()) for p in session_processes(proc.pid)]
    assert not left, f"processes of the run left behind: {left}"
    return proc.returncode, out, took


def dump_rows(run: Path, epoch: int) -> list[dict]:
    path = run / "rollouts" / f"epoch_{epoch:04d}" / "rollouts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def exported_weights(run: Path) -> dict:
    """The rl stage's exported policy: every tensor of its safetensors files."""
    files = sorted((run / "checkpoints" / "rl").rglob("*.safetensors"))
    assert files, f"{run} has no exported rl policy"
    return {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """The COMPARED run without faults."""
    run = tmp_path_factory.mktemp("clean") / "run"
    code, out, _ = finish(start_run(run, *COMPARED))
    assert code == 0, out[-3000:]
    return run


def test_rollout_actor_killed_mid_epoch_loses_and_repeats_nothing(tmp_path, clean_run):
    epochs = 4
    proc = start_run(tmp_path / "faulty", *COMPARED)
    kills = []
    for epoch in (0, 2):  # kill while an actor is sampling, in the epoch after this dump
        wait_for(tmp_path / "faulty" / "rollouts" / f"epoch_{epoch:04d}" / "rollouts.jsonl", proc)
        victim = find_process(proc.pid, "ray::RolloutActor.sample_and_score")
        victim.kill()
        kills.append(victim.pid)
    code, out, _ = finish(proc)
    assert code == 0, out[-3000:]

    # Every epoch has each prompt's K samples exactly once.
    for epoch in range(epochs):
        rows = dump_rows(tmp_path / "faulty", epoch)
        ids = [row["sample_id"] for row in rows]
        assert len(ids) == PROMPTS * K and len(set(ids)) == len(ids), (epoch, ids)
        assert {row["sample"] for row in rows} == set(range(K))
    summary = json.loads((tmp_path / "faulty" / "summary.json").read_text())
    counts = summary["faults"]["counts"]
    assert counts["rollout_chunks_redispatched"] >= len(kills), counts
    assert counts["rollout_actor_restarts"] >= 1, counts
    assert summary["stages"]["rl"]["faults"] == counts
    acc = EventAccumulator(str(tmp_path / "faulty" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("faults/rollout_chunks_redispatched")[-1].value == counts["rollout_chunks_redispatched"]

    # Chunks sampled again with the same rows, seed and weights: the run ends where an unharmed one does.
    faulty, reference = exported_weights(tmp_path / "faulty"), exported_weights(clean_run)
    assert faulty.keys() == reference.keys()
    assert all((faulty[k] == reference[k]).all() for k in faulty)
    for epoch in range(epochs):
        assert [r["reward"] for r in dump_rows(tmp_path / "faulty", epoch)] == [
            r["reward"] for r in dump_rows(clean_run, epoch)]


@pytest.mark.slow  # three runs' worth of time: the slow suite (.ci/run runs it when time allows)
def test_learner_rank_killed_stops_the_run_naming_it_and_resume_matches(tmp_path, clean_run):
    run = tmp_path / "killed"
    proc = start_run(run, *COMPARED)
    wait_for(run / "rollouts" / "epoch_0002" / "rollouts.jsonl", proc)  # after the epoch-2 checkpoint
    find_process(proc.pid, "ray::Learner").kill()
    killed_at = time.time()
    code, out, _ = finish(proc)
    noticed_s = time.time() - killed_at
    assert code == 1, out[-3000:]
    assert "learner rank" in out and "died" in out and "--resume" in out, out[-3000:]
    assert noticed_s < 120, noticed_s
    stopped = json.loads((run / "summary.json").read_text())["stopped"]
    assert stopped["stage"] == "rl" and "learner rank" in stopped["error"]

    resumed = start_run(run, *COMPARED, resume=True)
    code, out, _ = finish(resumed)
    assert code == 0, out[-3000:]
    assert "rl: resumed from" in out
    resumed_weights, reference = exported_weights(run), exported_weights(clean_run)
    assert all((resumed_weights[k] == reference[k]).all() for k in reference)


def test_ctrl_c_checkpoints_and_exits_130_without_orphans(tmp_path):
    run = tmp_path / "run"
    proc = start_run(run, "rl.epochs=50", "rl.checkpoint_every=100")
    wait_for(run / "rollouts" / "epoch_0000" / "rollouts.jsonl", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    code, out, took = finish(proc, timeout_s=300)
    assert code == 130, out[-3000:]
    assert "stopped by Ctrl-C at rl epoch" in out and "after its checkpoint" in out, out[-3000:]
    latest = json.loads((run / "checkpoints" / "deepspeed" / "rl" / "latest.json").read_text())
    assert latest, "no checkpoint was written on Ctrl-C"
    stopped = json.loads((run / "summary.json").read_text())["stopped"]
    assert stopped["type"] == "Interrupted"


@pytest.mark.slow  # 40 s; the guard's counting and decision are unit-tested in tests/actors/test_fault_log.py
def test_reward_guard_stops_a_run_whose_scorer_always_fails(tmp_path):
    # A reward model that times out on every batch: a forward pass takes far longer than 0.1 ms (the probe
    # before a scorer goes live has no time limit, so it starts).
    config = load_config("configs/tiny.yaml", SMALL)
    save_reward_model(build_reward_model({**reward_model_spec(config.reward_model), "seed": 0}), tmp_path / "rm")
    scorers = f"reward.scorers=[{{name: bt, kind: bradley_terry, path: {tmp_path / 'rm'}}}]"
    proc = start_run(tmp_path / "run", "rl.epochs=20", "rl.checkpoint_every=100", "reward.request_timeout_s=0.0001",
                     "rl.unscored_patience=2", scorers)
    code, out, _ = finish(proc)
    assert code == 1, out[-3000:]
    assert "reward guard" in out and "scorer 'bt'" in out and "epochs 0-1" in out, out[-3000:]
    assert "timed out" in out or "busy" in out, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["faults"]["counts"]["unscored_samples"] == 2 * PROMPTS * K
    assert sum(summary["faults"]["scorer_failures"]["bt"].values()) >= 2 * PROMPTS * K
    assert summary["stopped"]["stage"] == "rl" and "reward guard" in summary["stopped"]["error"]
