"""Which Ray cluster a run gets: without an address always a new local one (a stale address file or
RAY_ADDRESS of a dead head is ignored), with --address that one, or a clear error naming it.

Each case runs in a subprocess of its own, so this test process's Ray stays clean; the stale address
file is written under a RAY_TMPDIR of the test's own, never in /tmp/ray.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.integration

CONNECT = """
import sys
import ray
from actors.cluster import connect
from posterrl.config import load_config

config = load_config("configs/tiny.yaml", ["cluster.num_cpus=3", "cluster.num_gpus=0", "cluster.dashboard=false"])
try:
    connect(config, run_dir=sys.argv[1])
    print("CPUS", ray.cluster_resources().get("CPU"), flush=True)
finally:
    ray.shutdown()
"""


@pytest.fixture
def ray_tmpdir():
    """A short RAY_TMPDIR of this test's own (Ray's socket paths must stay short), removed afterwards."""
    root = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _env(ray_tmpdir, **extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    return {**env, "RAY_TMPDIR": ray_tmpdir, "RAY_gcs_server_port_wait_time_s": "2", **extra}


@pytest.mark.parametrize("stale", ["address_file", "RAY_ADDRESS"])
def test_without_an_address_a_new_local_cluster_starts_despite_a_stale_one(stale, ray_tmpdir, tmp_path):
    extra = {}
    if stale == "address_file":  # what a head killed without `ray stop` leaves behind
        os.makedirs(os.path.join(ray_tmpdir, "ray"))
        with open(os.path.join(ray_tmpdir, "ray", "ray_current_cluster"), "w") as handle:
            handle.write("127.0.0.1:1")
    else:
        extra["RAY_ADDRESS"] = "127.0.0.1:1"
    proc = subprocess.run([sys.executable, "-c", CONNECT, str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env=_env(ray_tmpdir, **extra))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPUS 3.0" in proc.stdout


def test_an_unreachable_address_is_a_clear_error(ray_tmpdir, tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "posterrl.cli", "run", "configs/tiny.yaml", "--run-dir",
                           str(tmp_path / "run"), "--address", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=240, env=_env(ray_tmpdir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "127.0.0.1:1" in proc.stdout and "error" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60  # a refused port is said at once, not after Ray's ~90 s of retries
