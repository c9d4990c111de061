"""A run's own Ray cluster (started as `posterrl run` starts it, actors.cluster.connect with a run directory):
token authentication on, the token in a 0600 file of the run that `posterrl reward --run` finds, clients
without it refused, and the dashboard on loopback, behind the same token. One cluster for the module."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray.util.state import list_actors

from actors.cluster import connect, use_token_file
from actors.reward_server import start_reward_server
from posterrl.config import load_config
from posterrl.runlog import CLUSTER_FILE, TOKEN_FILE, RunDir

pytestmark = pytest.mark.integration
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
RAY_CLI = str(Path(sys.executable).parent / "ray")

CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    ray.cluster_resources()
except Exception as exc:
    print("REFUSED", type(exc).__name__, str(exc)[:300])
    sys.exit(3)
print("CONNECTED")
"""


@pytest.fixture(scope="module")
def secured_run(tmp_path_factory):
    assert not ray.is_initialized()
    saved = {name: os.environ.get(name) for name in AUTH_VARS}
    root = tmp_path_factory.mktemp("secured")
    config = load_config("configs/tiny.yaml", ["stages=[data]", "reward.scorers=[{name: keep, kind: preservation}]"])
    run = RunDir(root / "run").create(config)
    connect(config, run_dir=run.root)
    server = start_reward_server(config, run)  # writes cluster.json, as the reward and rl stages do
    try:
        yield run, root, ray.get_runtime_context().gcs_address
    finally:
        ray.kill(server, no_restart=True)
        ray.shutdown()
        for name, value in saved.items():  # back to the session's token (tests/conftest.py)
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        if saved["RAY_AUTH_TOKEN_PATH"]:
            use_token_file(saved["RAY_AUTH_TOKEN_PATH"])


def stranger_env(root, **auth: str) -> dict[str, str]:
    """An environment with no token anywhere Ray looks (no variable, no ~/.ray/auth_token), plus `auth`."""
    home = root / "stranger_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return {**env, "HOME": str(home), **auth}


def test_the_token_is_the_runs_own_and_private(secured_run):
    run, _, address = secured_run
    token = run.root / TOKEN_FILE
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text()) == 64  # 256 bits, hex
    info = json.loads((run.root / CLUSTER_FILE).read_text())
    assert info["address"] == address and info["auth_mode"] == "token"
    assert info["token_file"] == str(token.resolve())


@pytest.mark.parametrize("auth", ["none", "missing token", "wrong token"])
def test_a_client_without_the_token_is_refused(secured_run, auth):
    _, root, address = secured_run
    extra = {"none": {},  # a client that does not even try token auth
             "missing token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "no_such_token")},
             "wrong token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}}[auth]
    # Ray retries a refused GCS connection about 20 times, once a second; two tries tell as much.
    env = stranger_env(root, RAY_gcs_server_port_wait_time_s="2", **extra)
    proc = subprocess.run([sys.executable, "-c", CLIENT, address], capture_output=True, text=True, timeout=180,
                          env=env)
    assert proc.returncode != 0 and "CONNECTED" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and ("Authentication" in proc.stdout + proc.stderr), proc.stderr[-2000:]


def test_the_cli_finds_the_token_through_the_run_directory(secured_run):
    run, root, _ = secured_run
    proc = subprocess.run([sys.executable, "-m", "posterrl.cli", "reward", "list", "--run", str(run.root)],
                          capture_output=True, text=True, timeout=180, env=stranger_env(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "keep" in proc.stdout and "preservation" in proc.stdout


def test_the_state_api_lists_the_runs_actors_behind_the_token(secured_run):
    run, root, address = secured_run
    assert ray._private.worker.get_dashboard_url().startswith("127.0.0.1:")
    assert any(a.class_name == "RewardServer" and a.state == "ALIVE" for a in list_actors(address=address))
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(run.root / TOKEN_FILE)}
    listed = subprocess.run([RAY_CLI, "list", "actors", "--address", address], capture_output=True, text=True,
                            timeout=180, env=stranger_env(root, **token))
    assert listed.returncode == 0 and "RewardServer" in listed.stdout, listed.stdout + listed.stderr[-2000:]
    refused = subprocess.run([RAY_CLI, "list", "actors", "--address", address], capture_output=True, text=True,
                             timeout=180, env=stranger_env(root, RAY_AUTH_MODE="token",
                                                           RAY_AUTH_TOKEN="0" * 64))
    assert refused.returncode != 0 and "RewardServer" not in refused.stdout
