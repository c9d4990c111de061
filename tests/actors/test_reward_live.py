"""The reward server as a real named Ray actor, changed from the real CLI while clients hammer it."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from actors.reward_server import find_reward_server, probe_samples, start_reward_server
from posterrl.config import load_config
from posterrl.models.reward_model import build_reward_model, reward_model_spec, save_reward_model
from posterrl.runlog import RunDir

pytestmark = pytest.mark.integration
CLIENTS = 32


def reward_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posterrl.cli", "reward", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def live_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    config = load_config("configs/tiny.yaml", ["stages=[data]", "reward.max_wait_ms=20", "reward.max_batch_size=16"])
    spec = reward_model_spec(config.reward_model)
    for name, seed in (("rm_a", 0), ("rm_b", 1)):
        save_reward_model(build_reward_model({**spec, "seed": seed}), root / name)
    corrupt = root / "rm_corrupt"
    save_reward_model(build_reward_model(spec), corrupt)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(b"not a tensor file")
    scorer = f"reward.scorers=[{{name: bt, kind: bradley_terry, path: {root / 'rm_a'}}}]"
    config = load_config("configs/tiny.yaml", ["stages=[data]", "reward.max_wait_ms=20", "reward.max_batch_size=16",
                                               scorer])
    run = RunDir(root / "run").create(config)
    server = start_reward_server(config, run)
    yield config, run, server, root
    ray.kill(server, no_restart=True)


def test_swap_under_concurrent_load_keeps_every_request(live_run):
    _, run, server, root = live_run
    samples = probe_samples(load_config("configs/tiny.yaml"), 2)
    records, errors, stop = [], [], threading.Event()

    def client(index: int) -> None:
        while not stop.is_set():
            sent = time.perf_counter()
            try:
                results = ray.get(server.score.remote(samples), timeout=120)
            except Exception as exc:  # any lost or failed request fails the test
                errors.append(repr(exc))
                return
            records.append((sent, time.perf_counter(), [r.versions["bt"] for r in results],
                            [r.reward for r in results]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    swap_began = time.perf_counter()
    answer = reward_cli("swap", "--run", str(run.root), "--name", "bt", "--path", str(root / "rm_b"))
    swap_ended = time.perf_counter()
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(timeout=180)

    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "version 2" in answer.stdout
    assert errors == []
    before = [r for r in records if r[1] < swap_began]
    after = [r for r in records if r[0] > swap_ended]
    assert len(before) > CLIENTS and len(after) > CLIENTS  # the load really spanned the swap
    assert all(versions == [1, 1] for _, _, versions, _ in before)
    assert all(versions == [2, 2] for _, _, versions, _ in after)
    assert all(r is not None for *_, rewards in records for r in rewards)
    assert {tuple(rewards) for *_, versions, rewards in before} != {tuple(rewards) for *_, versions, rewards in after}


def test_failed_swap_leaves_the_old_model_serving(live_run):
    _, run, server, root = live_run
    version = ray.get(server.describe.remote())["scorers"][0]["version"]
    missing = reward_cli("swap", "--run", str(run.root), "--name", "bt", "--path", str(root / "nowhere"))
    assert missing.returncode == 1
    assert "refused" in missing.stdout and str(root / "nowhere") in missing.stdout
    corrupt = reward_cli("swap", "--run", str(run.root), "--name", "bt", "--path", str(root / "rm_corrupt"))
    assert corrupt.returncode == 1 and "failed to load" in corrupt.stdout
    listed = reward_cli("list", "--run", str(run.root))
    assert listed.returncode == 0 and "bt" in listed.stdout
    described = ray.get(server.describe.remote())
    assert described["scorers"][0]["version"] == version
    results = ray.get(server.score.remote(probe_samples(load_config("configs/tiny.yaml"), 1)))
    assert results[0].reward is not None and results[0].versions == {"bt": version}


def test_shadow_scorer_then_promotion(live_run):
    _, run, server, root = live_run
    sample = probe_samples(load_config("configs/tiny.yaml"), 1)
    live_only = ray.get(server.score.remote(sample))[0]
    added = reward_cli("add", "--run", str(run.root), "--name", "candidate", "--kind", "bradley_terry",
                       "--path", str(root / "rm_a"), "--weight", "0")
    assert added.returncode == 0 and "shadow" in added.stdout
    shadowed = ray.get(server.score.remote(sample))[0]
    assert shadowed.reward == pytest.approx(live_only.reward)  # scored and reported, not counted
    assert set(shadowed.components) == {"bt", "candidate"}
    promoted = reward_cli("set-weight", "--run", str(run.root), "--name", "candidate", "--weight", "0.5")
    assert promoted.returncode == 0
    counted = ray.get(server.score.remote(sample))[0]
    assert counted.reward == pytest.approx(live_only.reward + 0.5 * shadowed.components["candidate"])


def test_killed_server_comes_back_with_the_journaled_registry(live_run):
    config, run, server, _ = live_run
    before = ray.get(server.describe.remote())
    ray.kill(server, no_restart=False)
    deadline = time.time() + 120
    while True:
        try:
            after = ray.get(find_reward_server(run.root).describe.remote(), timeout=60)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.time() > deadline:
                raise
            time.sleep(1)
    assert after["pid"] != before["pid"]
    strip = [{k: v for k, v in s.items() if k != "loaded_at"} for s in before["scorers"]]
    assert [{k: v for k, v in s.items() if k != "loaded_at"} for s in after["scorers"]] == strip
    assert after["restore_problems"] == []
    journal = [json.loads(line)["op"] for line in (run.root / "reward_journal.jsonl").read_text().splitlines()]
    assert journal[:3] == ["swap", "add", "set_weight"]


def test_changes_are_in_tensorboard(live_run):
    _, run, server, _ = live_run
    ray.get(server.describe.remote())
    events = EventAccumulator(str(Path(run.tb) / "reward_server"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    versions = [e.value for e in events.Scalars("reward/bt/version")]
    assert 1.0 in versions and 2.0 in versions
    texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("reward/changes/text_summary")]
    assert any("swap" in t for t in texts) and any("refused" in t for t in texts)
