"""The released pipelines through the real CLI: `posterrl model make-tiny`, then `posterrl run
configs/<kind>_tiny.yaml` (data -> sft -> distill -> reward -> rl -> eval) on a real local Ray cluster with two
DeepSpeed ranks, LoRA on the released transformer class (FLUX.1 Kontext in the default suite, Qwen-Image-Edit in the
slow one: the same code path, 55 s each). Checks that every stage trained the adapters (and only them), that exports and
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
from posterrl.models.pipeline_policy import LORA_FILE

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


# per kind: the LoRA tensors (A and B of each target module) and what DeepSpeed keeps of the frozen base: it drops
# frozen parameters by their named_parameters() names, and T5's input embedding is also in the state dict under
# its tied alias, which it keeps (a documented limit)
KINDS = {"flux_kontext": (28, ["model.text_encoder_2.encoder.embed_tokens.weight"]),
         "qwen_image_edit": (32, [])}
# adapters that never get a gradient: in Qwen-Image-Edit's last block the text stream's outputs feed nothing
UNTRAINED = {"flux_kontext": set(),
             "qwen_image_edit": {f"transformer.transformer_blocks.1.attn.{m}.lora_B.weight"
                                 for m in ("add_q_proj", "to_add_out")}}


@pytest.fixture(scope="module", params=[
    "flux_kontext", pytest.param("qwen_image_edit", marks=pytest.mark.slow)])
def run(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    checkpoint = root / f"{kind}_tiny"
    posterrl("model", "make-tiny", "--kind", kind, "--out", str(checkpoint))
    run_dir = root / "run"
    posterrl("run", f"configs/{kind}_tiny.yaml", *OVERRIDES, f"model.pretrained_path={checkpoint}",
             "--run-dir", str(run_dir))
    return run_dir, kind


def adapters(run_dir, export):
    return load_file(str(run_dir / "checkpoints" / export / LORA_FILE))


def test_every_stage_ran_and_trained_the_adapters(run):
    run_dir, _ = run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {"data", "sft", "distill", "reward", "rl", "eval"}
    assert list(summary["gold"]) == ["unedited input", "untrained", "local expert", "global expert", "student",
                                     "after RL"]
    for export in EXPORTS:
        folder = run_dir / "checkpoints" / export
        spec = json.loads((folder / "posterrl_policy.json").read_text())
        assert spec["kind"] == run[1] and spec["lora"]["rank"] == 4
        assert (folder / LORA_FILE).is_file() and not (folder / "transformer").exists()  # adapters only
    # B starts at 0; sft moved it, distill (from the local expert) and rl moved it on
    local, student, after_rl = adapters(run_dir, "sft/local"), adapters(run_dir, "distill"), adapters(run_dir, "rl")
    b_keys = [k for k in local if ".lora_B." in k]
    assert b_keys and {k for k in b_keys if not local[k].any()} == UNTRAINED[run[1]]
    assert any(not torch.equal(local[k], student[k]) for k in local)
    assert any(not torch.equal(student[k], after_rl[k]) for k in student)
    assert torch.equal(torch.cat([v.flatten() for v in adapters(run_dir, "eval").values()]),
                       torch.cat([v.flatten() for v in after_rl.values()]))  # eval exports what it evaluated
    assert summary["stages"]["rl"]["epochs"] == 2 and summary["stages"]["rl"]["steps"] > 0
    # sft and distill targets VAE-encoded once per row, kept beside the run (2 posters x 6 tasks at most)
    cached = list((run_dir / "latents").rglob("*.safetensors"))
    assert 0 < len(cached) <= 2 * 6 and len({path.parent for path in cached}) == 1


def test_deepspeed_checkpoints_hold_the_adapters_not_the_base(run):
    run_dir, kind = run
    lora_tensors, kept_aliases = KINDS[kind]
    states = list((run_dir / "checkpoints" / "deepspeed").rglob("mp_rank_00_model_states.pt"))
    assert states
    for path in states:
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
        assert sorted(k for k in module if ".lora_" not in k) == kept_aliases
        assert sum(".lora_" in k for k in module) == lora_tensors


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
    proc = posterrl("run", f"configs/{run[1]}_tiny.yaml", *OVERRIDES, "rl.epochs=3",
                    f"model.pretrained_path={checkpoint}", "--run-dir", str(run_dir), "--resume", "--force-config")
    assert "rl: resumed from" in proc.stdout, proc.stdout[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["stages"]["rl"]["epochs"] == 3
    assert any(not torch.equal(before[k], v) for k, v in adapters(run_dir, "rl").items())
