"""The rl stage through the real CLI, real Ray (2 rollout actors, the reward server) and real DeepSpeed
(2 learner ranks), with a Bradley-Terry model swapped by `posterrl reward swap` while it runs."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from posterrl.config import load_config
from posterrl.data.manifest import load_manifest
from posterrl.data.tasks import TASKS
from posterrl.models.reward_model import build_reward_model, reward_model_spec, save_reward_model
from posterrl.models.samples import EditSample
from posterrl.policy import EditPolicy
from reward_server.bradley_terry import BradleyTerryScorer
from reward_server.rules import PreservationScorer

pytestmark = pytest.mark.integration

SMALL = ["data.n_train=2", "data.n_val=1", "data.chunks=2", "rollout.eval_per_task=1", "rollout.num_steps=2",
         "rollout.group_size=2", "learner.micro_batch_size=2", "sft.batch_size=4", "distill.batch_size=4",
         "logging.progress=false", "rl.prompts_per_epoch=6", "rl.batch_size=4", "rl.log_images_every=1",
         "rl.dump_every=1"]
EPOCHS = 20  # the swap lands after epoch 1; the CLI needs a few seconds, so most epochs come after it


def posterrl(*args, check=True, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "posterrl.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"posterrl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def prepare_run(root, overrides):
    """A run directory holding a 'distilled' policy (config init) and two reward models, before RL."""
    config = load_config("configs/tiny.yaml", overrides)
    EditPolicy.from_config(config.model, config.rollout).save_pretrained(root / "run" / "checkpoints" / "distill")
    spec = reward_model_spec(config.reward_model)
    for name, seed in (("rm_a", 0), ("rm_b", 1)):
        save_reward_model(build_reward_model({**spec, "seed": seed}), root / name)
    return root / "run"


def read_dumps(run):
    rows = []
    for jsonl in sorted((run / "rollouts").glob("epoch_*/rollouts.jsonl")):
        rows += [json.loads(line) for line in jsonl.read_text().splitlines()]
    return rows


@pytest.fixture(scope="module")
def swapped_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    scorers = (f"reward.scorers=[{{name: bt, kind: bradley_terry, path: {root / 'rm_a'}}}, "
               "{name: keep, kind: preservation, weight: 0.5}]")
    overrides = [*SMALL, "stages=[data,rl]", scorers, f"rl.epochs={EPOCHS}", "rl.eval_every=10",
                 "rl.checkpoint_every=10"]
    run = prepare_run(root, overrides)
    proc = subprocess.Popen([sys.executable, "-m", "posterrl.cli", "run", "configs/tiny.yaml", *overrides,
                             "--run-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (run / "rollouts" / "epoch_0001" / "rollouts.jsonl").exists():
        assert proc.poll() is None, f"the run ended before its second epoch:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no rollouts after 600 s"
        time.sleep(0.2)
    swap = posterrl("reward", "swap", "--run", str(run), "--name", "bt", "--path", str(root / "rm_b"), check=False)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return run, root, swap, out


def test_swap_mid_run_goes_live_on_the_next_epochs(swapped_run):
    run, _, swap, _ = swapped_run
    assert swap.returncode == 0, swap.stdout + swap.stderr
    rows = read_dumps(run)
    per_epoch = {}
    for row in rows:
        per_epoch.setdefault(row["epoch"], set()).add(row["reward_versions"]["bt"])
    versions = [per_epoch[e] for e in sorted(per_epoch)]
    assert versions[0] == {1} and versions[-1] == {2}, versions
    first_new = next(i for i, v in enumerate(versions) if 2 in v)
    # Once a result carries the new version, every later epoch does; the shadow-free preservation rule is untouched.
    assert all(v == {2} for v in versions[first_new + 1 :])
    assert all(row["reward_versions"]["keep"] == 1 for row in rows)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb_versions = [v.value for v in acc.Scalars("reward/bt/version")]
    assert tb_versions[0] == 1 and tb_versions[-1] == 2 and tb_versions == sorted(tb_versions)


def test_policy_versions_increase_every_epoch(swapped_run):
    run = swapped_run[0]
    rows = read_dumps(run)
    by_epoch = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], set()).add(row["policy_version"])
    assert sorted(by_epoch) == list(range(EPOCHS))  # dump_every=1: every epoch on disk
    assert all(by_epoch[e] == {e} for e in by_epoch)  # sync mode: epoch e samples with version e


def test_dump_rows_match_the_images_written(swapped_run):
    run, root, _, _ = swapped_run
    folder = run / "rollouts" / f"epoch_{EPOCHS - 1:04d}"
    rows = [json.loads(line) for line in (folder / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(p.name for p in folder.glob("*.png"))
    assert len(rows) == 6 * 2 and {r["task"] for r in rows} == set(TASKS)
    manifest = {r.id: r for r in load_manifest(run / "data" / "train" / "manifest.jsonl").rows}
    samples = [EditSample(r["prompt_id"], r["task"], r["instruction"], manifest[r["prompt_id"]].load_inputs(),
                          Image.open(folder / r["image"]).convert("RGB"), manifest[r["prompt_id"]].meta) for r in rows]
    # Scoring the PNGs again gives the rewards recorded beside them: the files are what was scored.
    keep = PreservationScorer().score(samples).scores
    bt = BradleyTerryScorer(root / "rm_b").score(samples).scores
    for row, k, b in zip(rows, keep, bt):
        if np.isfinite(k):
            assert row["rewards"]["keep"] == pytest.approx(k, abs=1e-9)
        assert row["rewards"]["bt"] == pytest.approx(b, abs=1e-4)
        assert row["reward"] == pytest.approx(b + 0.5 * row["rewards"].get("keep", 0.0), abs=1e-4)
        assert row["r"] is None or 0.0 <= row["r"] <= 1.0


def test_tensorboard_has_rollout_scalars_grids_text_and_histograms(swapped_run):
    run = swapped_run[0]
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0,
                                                           "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for scalar in ("reward/bt/mean", "reward/bt/std", "reward/keep/mean", "reward/combined/mean", "rl/r_mean",
                   "rl/eta", "learner/loss", "learner/kl", "learner/grad_norm", "rl/filtered_groups",
                   "perf/rollout_s", "perf/reward_s", "perf/train_s", "perf/weight_sync_s", "perf/images_per_s",
                   *(f"reward/task/{t}/mean" for t in TASKS)):
        values = [v.value for v in acc.Scalars(scalar)]
        assert len(values) == EPOCHS, scalar
        assert all(np.isfinite(values)), scalar
    assert "eval/task/filling/gold" in tags["scalars"]  # rl.eval_every=10: the epoch-10 evaluation
    for task in TASKS:
        assert f"rollout/{task}/group0" in tags["images"]
        assert f"rollout/{task}/group0/text_summary" in tags["tensors"]
        assert f"reward/task/{task}/hist" in tags["histograms"]
    image = acc.Images(f"rollout/{TASKS[0]}/group0")[-1]
    assert image.width >= 112 * 3  # the input, then K = 2 outputs
    text = acc.Tensors(f"rollout/{TASKS[0]}/group0/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "bt v2" in text and f"policy v{EPOCHS - 1}" in text
    eta = [v.value for v in acc.Scalars("rl/eta")]
    assert eta[0] == 0.0 and eta[-1] == pytest.approx(0.001 * (EPOCHS - 1))  # min(0.001 * update, 0.5)


def test_rl_trains_the_policy_and_exports_it(swapped_run):
    run = swapped_run[0]
    summary = json.loads((run / "summary.json").read_text())
    rl = summary["stages"]["rl"]
    assert [h["epoch"] for h in rl["history"]] == list(range(1, EPOCHS + 1))
    before = EditPolicy.from_pretrained(run / "checkpoints" / "distill").state_dict()
    after = EditPolicy.from_pretrained(run / "checkpoints" / "rl").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert (run / "checkpoints" / "deepspeed" / "rl" / "latest.json").is_file()


def test_off_policy_run_killed_and_resumed(tmp_path, killed_when):
    scorers = "reward.scorers=[{name: keep, kind: preservation}]"
    overrides = [*SMALL, "stages=[data,rl]", scorers, "rl.mode=off_policy", "rl.eval_every=100",
                 "rl.checkpoint_every=2", "rl.epochs=8"]
    run = prepare_run(tmp_path, overrides)
    args = ["run", "configs/tiny.yaml", *overrides, "--run-dir", str(run)]
    latest = run / "checkpoints" / "deepspeed" / "rl" / "latest.json"
    killed_when(args, latest)
    before = {row["epoch"]: row["policy_version"] for row in read_dumps(run)}
    # Epoch e's rollouts were submitted before epoch e-1 trained: version e-1 (epoch 0 has the start policy).
    assert before[0] == 0 and all(before[e] == e - 1 for e in before if e > 0), before

    resumed = posterrl(*args, "--resume")
    start = int(resumed.stdout.split("at epoch ")[1].split()[0])
    assert f"rl: resumed from {latest.parent}" in resumed.stdout and start >= 2 and start % 2 == 0
    after = {row["epoch"]: row["policy_version"] for row in read_dumps(run)}
    assert sorted(after) == list(range(8))
    # The resumed run publishes version `start` (theta_old from the checkpoint), samples epoch `start` with it,
    # and is one update stale again from there on.
    assert after[start] == start and all(after[e] == e - 1 for e in range(start + 1, 8)), after
    summary = json.loads((run / "summary.json").read_text())
    assert [h["epoch"] for h in summary["stages"]["rl"]["history"]] == list(range(1, 9))
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert max(v.value for v in acc.Scalars("rl/staleness")) == 1.0
    eta = {v.step: v.value for v in acc.Scalars("rl/eta")}
    assert sorted(eta.values())[-1] == pytest.approx(0.007)  # eight soft updates, counted across the restart
