"""FLUX.1 Kontext through the real CLI: `posterrl model make-tiny`, then `posterrl run configs/flux_kontext_tiny.yaml`
(data -> sft -> distill -> reward -> rl -> eval) on a real local Ray cluster with two DeepSpeed ranks, LoRA on the
released transformer class. Checks that every stage trained the adapters (and only them), that exports and
DeepSpeed checkpoints hold adapters only, that resuming from them works, and that TensorBoard holds the same
rollout inspection as the tiny default."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from posterrl.data.tasks import TASKS
from posterrl.models.kontext_policy import LORA_FILE

pytestmark = pytest.mark.integration

OVERRIDES = ["data.n_train=2", "data.n_val=1", "rollout.eval_per_task=1", "rollout.num_steps=2", "sft.steps=3",
             "distill.steps=2", "sft.eval_every=3", "distill.eval_every=2", "sft.checkpoint_every=3",
             "distill.checkpoint_every=2", "reward_model.steps=4", "reward_model.eval_every=2",
             "rl.epochs=2", "rl.prompts_per_epoch=6", "rollout.group_size=2", "rl.batch_size=4",
             "logging.progress=false"]
EXPORTS = ("sft/local", "sft/global", "distill", "rl", "eval")


def posterrl(*args):
    proc = subprocess.run([sys.executable, "-m", "posterrl.cli", *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"posterrl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    checkpoint = root / "flux_kontext_tiny"
    posterrl("model", "make-tiny", "--kind", "flux_kontext", "--out", str(checkpoint))
    run_dir = root / "run"
    proc = posterrl("run", "configs/flux_kontext_tiny.yaml", *OVERRIDES, f"model.pretrained_path={checkpoint}",
                    "--run-dir", str(run_dir))
    return run_dir, proc


def adapters(run_dir, export):
    return load_file(str(run_dir / "checkpoints" / export / LORA_FILE))


def test_every_stage_ran_and_trained_the_adapters(run):
    run_dir, _ = run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {"data", "sft", "distill", "reward", "rl", "eval"}
    assert list(summary["gold"]) == ["untrained", "local expert", "global expert", "student", "after RL"]
    for export in EXPORTS:
        folder = run_dir / "checkpoints" / export
        spec = json.loads((folder / "posterrl_policy.json").read_text())
        assert spec["kind"] == "flux_kontext" and spec["lora"]["rank"] == 4
        assert (folder / LORA_FILE).is_file() and not (folder / "transformer").exists()  # adapters only
    # B starts at 0; sft moved it, distill (from the local expert) and rl moved it on
    local, student, after_rl = adapters(run_dir, "sft/local"), adapters(run_dir, "distill"), adapters(run_dir, "rl")
    b_keys = [k for k in local if ".lora_B." in k]
    assert b_keys and all(local[k].abs().sum() > 0 for k in b_keys)
    assert any(not torch.equal(local[k], student[k]) for k in local)
    assert any(not torch.equal(student[k], after_rl[k]) for k in student)
    assert torch.equal(torch.cat([v.flatten() for v in adapters(run_dir, "eval").values()]),
                       torch.cat([v.flatten() for v in after_rl.values()]))  # eval exports what it evaluated
    assert summary["stages"]["rl"]["epochs"] == 2 and summary["stages"]["rl"]["steps"] > 0


def test_deepspeed_checkpoints_hold_the_adapters_not_the_base(run):
    run_dir, _ = run
    states = list((run_dir / "checkpoints" / "deepspeed").rglob("mp_rank_00_model_states.pt"))
    assert states
    for path in states:
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
        # DeepSpeed leaves out frozen parameters by their names in named_parameters(); T5's input embedding is
        # also in the state dict under its tied alias, which it keeps (a documented limit)
        extra = sorted(k for k in module if ".lora_" not in k)
        assert extra == ["model.text_encoder_2.encoder.embed_tokens.weight"], extra
        assert sum(".lora_" in k for k in module) == 28


def test_tensorboard_holds_the_rollout_inspection(run):
    run_dir, _ = run
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    images = set(events.Tags()["images"])
    assert {f"rollout/{task}/group0" for task in TASKS} <= images and {f"eval/{task}" for task in TASKS} <= images
    for tag in ("learner/loss", "learner/fm_loss", "learner/distill_loss", "learner/policy_loss",
                "reward/bt/mean", "eval/gold_mean"):
        values = [e.value for e in events.Scalars(tag)]
        assert values and all(v == v for v in values), tag


@pytest.mark.slow  # 35 s more on the shared run; test_stage_commands.py resumes the tiny default's checkpoints
def test_resume_continues_from_the_adapter_checkpoints(run):
    """As if the run had stopped after rl's last checkpoint: the rl stage picks up its adapter-only DeepSpeed
    checkpoint (the frozen base rebuilt from the checkpoint folder) and trains one more epoch."""
    run_dir, _ = run
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["completed"] = [s for s in summary["completed"] if s not in ("rl", "eval")]
    summary_path.write_text(json.dumps(summary))
    before = adapters(run_dir, "rl")
    checkpoint = json.loads((run_dir / "checkpoints" / "rl" / "posterrl_policy.json").read_text())["pretrained_path"]
    proc = posterrl("run", "configs/flux_kontext_tiny.yaml", *OVERRIDES, "rl.epochs=3",
                    f"model.pretrained_path={checkpoint}", "--run-dir", str(run_dir), "--resume", "--force-config")
    assert "rl: resumed from" in proc.stdout, proc.stdout[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["stages"]["rl"]["epochs"] == 3
    assert any(not torch.equal(before[k], v) for k, v in adapters(run_dir, "rl").items())
