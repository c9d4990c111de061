"""Smoke test of the real CLI: the whole `posterrl run` pipeline (data -> sft -> distill -> reward -> rl -> eval)
at toy length on a real local Ray cluster with real DeepSpeed ranks, then `posterrl sample` on its exports."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from posterrl.config import load_config
from posterrl.data.gold import gold_metric
from posterrl.data.manifest import load_manifest
from posterrl.data.tasks import TASKS

pytestmark = pytest.mark.integration

OVERRIDES = ["stages=[data,sft,distill,reward,rl,eval]", "reward_model.steps=4", "reward_model.batch_size=8",
             "reward_model.eval_every=2", "reward_model.samples_per_prompt=2", "reward_model.negative_pairs=true",
             "reward_model.difference_channels=true", "data.n_reward=1", "data.n_train=3", "data.n_val=2",
             "data.chunks=2", "rollout.eval_per_task=1", "rollout.num_steps=2", "sft.steps=3", "distill.steps=2",
             "sft.eval_every=2", "distill.eval_every=2", "sft.checkpoint_every=2", "distill.checkpoint_every=2",
             "sft.batch_size=4", "distill.batch_size=4", "sft.local_steps=null",
             "learner.micro_batch_size=2", "logging.progress=false", "rl.epochs=2", "rl.prompts_per_epoch=6",
             "rollout.group_size=2", "rl.batch_size=4"]
ROWS = ["untrained", "local expert", "global expert", "student", "after RL"]


def posterrl(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "posterrl.cli", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"posterrl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "tiny"
    posterrl("run", "configs/tiny.yaml", *OVERRIDES, "--run-dir", str(run))
    return run


def test_run_directory_layout(run_dir):
    assert load_config(run_dir / "config.yaml") == load_config("configs/tiny.yaml", OVERRIDES)
    assert (run_dir / "checkpoints" / "reward" / "posterrl_reward_model.json").is_file()
    assert (run_dir / "cluster.json").is_file()
    for export in ("sft/local", "sft/global", "distill", "rl", "eval"):
        assert (run_dir / "checkpoints" / export / "posterrl_policy.json").is_file()
        assert (run_dir / "checkpoints" / export / "transformer" / "config.json").is_file()
    # DeepSpeed states for resume, the last one complete
    for name in ("sft_local", "sft_global", "distill"):
        assert (run_dir / "checkpoints" / "deepspeed" / name / "latest.json").is_file()
    train = load_manifest(run_dir / "data" / "train" / "manifest.jsonl", require_target=True)
    assert len(train.rows) == 3 * len(TASKS) and train.skipped == 0
    reward_rows = load_manifest(run_dir / "data" / "reward" / "manifest.jsonl", require_target=True).rows
    # the reward-only poster comes after the training and held-out ones
    assert [r.id for r in reward_rows] == [f"reward-000005-{t}" for t in TASKS]


def test_summary_has_stage_figures_and_gold_per_task(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {"data", "sft", "distill", "reward", "rl", "eval"}
    assert summary["stages"]["data"]["train"]["per_task"] == {t: 3 for t in TASKS}
    assert summary["stages"]["sft"]["local"]["steps"] == 3
    assert summary["stages"]["distill"]["final"]["learner/distill_loss"] >= 0
    assert list(summary["gold"]) == ["unedited input", *ROWS]
    reward = summary["stages"]["reward"]
    # (3 training + 1 reward-only posters) x 6 tasks, K = 2: one policy pair and one negative pair per prompt
    assert reward["train_pairs"] == {"policy": 24, "negative": 24, "manifest": 0}
    assert [h["step"] for h in reward["history"]] == [2, 4]
    assert 0.0 <= reward["held_out"]["pairwise_accuracy"] <= 1.0
    # the final evaluation ran with the reward server up: the learned reward of the same samples
    assert set(summary["reward"]["student"]) == {*TASKS, "mean"}
    assert all(v == v for v in summary["reward"]["student"].values())
    for row in ["unedited input", *ROWS]:
        gold = summary["gold"][row]
        assert set(gold) == {*TASKS, "mean"}
        assert all(0.0 <= v <= 1.0 for v in gold.values())
    # preservation of what the input shows: every evaluated policy, extending and filling only
    assert list(summary["known_region_psnr"]) == ROWS
    assert all(set(row) == {"extending", "filling"} and all(0.0 < v <= 60.0 for v in row.values())
               for row in summary["known_region_psnr"].values())


def test_tensorboard_has_gold_scalars_grids_and_text(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for scalar in ("learner/lr", "perf/samples_per_s"):
        values = acc.Scalars(scalar)
        assert len(values) == 3 + 3 + 2 and all(v.value == v.value for v in values)  # one per step, finite
    # sft and distill log every step (1..8); the rl stage logs once per epoch (2 epochs), after the reward stage.
    steps = [v.step for v in acc.Scalars("learner/loss")]
    assert steps[:8] == list(range(1, 9)) and len(steps) == 8 + 2 and min(steps[8:]) > 12
    for task in TASKS:
        assert f"eval/task/{task}/gold" in tags["scalars"]
        assert (f"eval/task/{task}/known_psnr" in tags["scalars"]) == (task in ("extending", "filling"))
        assert f"eval/{task}" in tags["images"]
        assert f"eval/{task}/instructions/text_summary" in tags["tensors"]
    image = acc.Images(f"eval/{TASKS[0]}")[0]
    assert image.width > 0 and image.height > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [v.step for v in acc.Scalars("learner/bt/loss")] == list(range(9, 13))  # after sft and distill
    assert len(acc.Scalars("eval/bt/pairwise_accuracy")) == 2
    assert "eval/reward_mean" in tags["scalars"] and f"eval/task/{TASKS[0]}/reward" in tags["scalars"]
    assert acc.Scalars("eval/gold_mean")[0].value == pytest.approx(summary["gold"]["untrained"]["mean"], abs=1e-6)
    assert acc.Scalars("eval/gold_mean")[-1].value == pytest.approx(summary["gold"]["after RL"]["mean"], abs=1e-6)


def test_final_table_has_gold_and_learned_reward_for_untrained_student_and_after_rl(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    table = summary["stages"]["eval"]["final_table"]
    assert list(table) == ["untrained", "student", "after RL"]
    for label, row in table.items():
        assert row["gold"] == summary["gold"][label]
        assert set(row["reward"]) == {*TASKS, "mean"} and all(v == v for v in row["reward"].values())
    assert summary["stages"]["rl"]["steps"] > 0


def test_sample_cli_reproduces_the_runs_evaluation_of_the_student(run_dir, tmp_path):
    out = tmp_path / "samples"
    posterrl("sample", "--checkpoint", str(run_dir / "checkpoints" / "distill"),
             "--manifest", str(run_dir / "data" / "val" / "manifest.jsonl"), "--out", str(out), "--seed", "0")
    rows = load_manifest(run_dir / "data" / "val" / "manifest.jsonl").rows
    assert sorted(p.stem for p in out.glob("*.png")) == sorted([r.id for r in rows] + ["grid"])
    gold = json.loads((run_dir / "summary.json").read_text())["gold"]["student"]
    for task in TASKS:
        first = next(r for r in rows if r.task == task)  # the eval stage scored the first row of each task
        score = gold_metric(task, Image.open(out / f"{first.id}.png"), first.load_target(), first.meta)
        assert score == pytest.approx(gold[task], abs=2e-3)


def test_student_transformer_loads_with_diffusers_in_a_fresh_process(run_dir):
    code = ("import sys; from diffusers import FluxTransformer2DModel; "
            "m = FluxTransformer2DModel.from_pretrained(sys.argv[1]); print(sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir / "checkpoints" / "distill" / "transformer")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) > 10_000


def test_rerun_without_resume_refuses_and_resume_keeps_data(run_dir):
    proc = posterrl("run", "configs/tiny.yaml", *OVERRIDES, "--run-dir", str(run_dir), check=False)
    assert proc.returncode == 2
    assert "already holds a run: pass --resume" in proc.stdout
    stamp = (run_dir / "data" / "train" / "generated.json").stat().st_mtime
    proc = posterrl("run", "configs/tiny.yaml", *OVERRIDES, "--run-dir", str(run_dir), "--resume")
    assert "already holds this split, kept" in proc.stdout
    assert (run_dir / "data" / "train" / "generated.json").stat().st_mtime == stamp


def test_bad_config_fails_before_ray_starts(tmp_path):
    proc = posterrl("run", "configs/tiny.yaml", "sft.lrr=1", "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert "did you mean 'sft.lr'?" in proc.stdout
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_model_folder_of_the_wrong_kind_is_refused_before_ray_starts(tmp_path):
    proc = posterrl("run", "configs/tiny.yaml", "model.kind=flux_kontext", f"model.pretrained_path={tmp_path}",
                    # the tiny pixel policy's options, which a released pipeline refuses
                    "model.residual=false", "model.input_concat=false", "model.prediction=velocity",
                    "model.input_detail=false",
                    "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert "no model_index.json" in proc.stdout and "FluxKontextPipeline" in proc.stdout
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_grids_script_puts_the_runs_last_eval_and_rollout_sheets_in_one_png(run_dir, tmp_path):
    out = tmp_path / "grids.png"
    proc = subprocess.run([sys.executable, "scripts/grids_from_run.py", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0}).Reload()
    rollout_tags = [t for t in acc.Tags()["images"] if t.startswith("rollout/") and t.endswith("/group0")]
    assert f"{out}: {len(TASKS) + len(rollout_tags)} grids" in proc.stdout
    sheet = Image.open(out)
    widest = max(acc.Images(f"eval/{task}")[-1].width for task in TASKS)
    assert sheet.width >= widest and sheet.height > 3 * 20
