"""The reward server's faults through real Ray: its process SIGKILLed under load, a scorer that does not load."""

import os
import signal
import time

import pytest
import ray

from actors.reward_server import find_reward_server, probe_samples, start_reward_server
from posterrl.config import load_config
from posterrl.models.reward_model import build_reward_model, reward_model_spec, save_reward_model
from posterrl.runlog import RunDir
from reward_server.registry import ScorerLoadError

pytestmark = pytest.mark.integration
REQUESTS = 200  # concurrent score requests of 2 samples each, batched 16 to a batch


def reward_config(scorers: str):
    return load_config("configs/tiny.yaml", ["stages=[data]", "reward.max_wait_ms=5", "reward.max_batch_size=32",
                                             f"reward.scorers={scorers}"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    spec = reward_model_spec(load_config("configs/tiny.yaml").reward_model)
    for name, seed in (("rm_a", 0), ("rm_b", 1)):
        save_reward_model(build_reward_model({**spec, "seed": seed}), root / name)
    return root


def test_sigkill_under_load_every_request_is_answered_by_the_journaled_version(ray_cluster, models, tmp_path):
    config = reward_config(f"[{{name: keep, kind: preservation, weight: 0.5}}, "
                           f"{{name: bt, kind: bradley_terry, path: {models / 'rm_a'}}}]")
    run = RunDir(tmp_path / "run").create(config)
    server = start_reward_server(config, run)
    try:
        # every handle retries a call whose server died: the one that started it and one looked up by name
        assert server._ray_max_task_retries == find_reward_server(run.root)._ray_max_task_retries == 3
        swapped = ray.get(server.swap.remote("bt", str(models / "rm_b")))
        assert swapped["ok"] and swapped["scorer"]["version"] == 2  # journaled
        before = ray.get(server.describe.remote())
        samples = probe_samples(config, 2)

        refs = [server.score.remote(samples, step) for step in range(REQUESTS)]
        ray.wait(refs, num_returns=1, timeout=60)  # the server is answering the first batches
        done_at_kill = len(ray.wait(refs, num_returns=REQUESTS, timeout=0)[0])
        os.kill(before["pid"], signal.SIGKILL)
        killed = time.perf_counter()
        answers = ray.get(refs, timeout=60)  # retried on the restarted server: none is lost or fails
        recovered_s = time.perf_counter() - killed
        after = ray.get(server.describe.remote())

        print(f"{done_at_kill}/{REQUESTS} answered before the kill; the restarted server answered "
              f"{after['stats']['requests']} requests; all answered {recovered_s:.1f} s after the kill")
        assert done_at_kill < REQUESTS  # the kill really hit requests in flight
        assert after["pid"] != before["pid"]
        assert after["stats"]["requests"] >= 1  # the restarted server answered what the killed one had not
        assert after["restore_problems"] == []
        assert {s["name"]: s["version"] for s in after["scorers"]} == {"keep": 1, "bt": 2}
        assert len(answers) == REQUESTS and all(len(results) == 2 for results in answers)
        # no reward from the wrong version: before and after the restart every result is the swapped model's
        assert {tuple(sorted(r.versions.items())) for results in answers for r in results} == {(("bt", 2), ("keep", 1))}
        assert all(r.reward is not None and r.failed == {} for results in answers for r in results)
        rewards = [[r.reward for r in results] for results in answers]  # one model, the same samples:
        assert rewards == [pytest.approx(rewards[0], abs=1e-5)] * REQUESTS  # the same rewards (to batching noise)
    finally:
        ray.kill(server, no_restart=True)


def test_scorer_that_does_not_load_stops_the_server_unless_optional(ray_cluster, tmp_path):
    missing = tmp_path / "nowhere"
    scorers = f"[{{name: keep, kind: preservation}}, {{name: bt, kind: bradley_terry, path: {missing}{{optional}}}}]"
    required = reward_config(scorers.replace("{optional}", ""))
    with pytest.raises(ScorerLoadError) as err:  # the constructor's message, not Ray's traceback
        start_reward_server(required, RunDir(tmp_path / "required").create(required))
    message = str(err.value)
    assert message.startswith("the reward server did not start: the reward server cannot start: scorer 'bt' "
                              "(kind bradley_terry, path "), message
    assert str(missing) in message and "is not optional" in message and "failed to load" in message
    assert "Traceback" not in message

    optional = reward_config(scorers.replace("{optional}", ", optional: true"))
    server = start_reward_server(optional, RunDir(tmp_path / "optional").create(optional))
    try:
        described = ray.get(server.describe.remote())
        assert [(s["name"], s["optional"]) for s in described["scorers"]] == [("keep", False)]
        assert len(described["restore_problems"]) == 1
        assert "scorer 'bt' (bradley_terry, path=" in described["restore_problems"][0]
        results = ray.get(server.score.remote(probe_samples(optional, 2)))
        assert [r.versions for r in results] == [{"keep": 1}] * 2
        assert all(r.reward is not None for r in results)
    finally:
        ray.kill(server, no_restart=True)
