import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster for the tests of one module."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _kill_session(session_id: int) -> None:
    """SIGKILL every process of a session: the driver and the Ray processes it started (Ray workers
    get process groups of their own but stay in the session). Nothing outside it is touched."""
    for _ in range(20):  # the raylet may start a worker while we kill: go round until none is left
        members = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == session_id:
                    process.kill()
                    members.append(process)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        if not members:
            return
        psutil.wait_procs(members, timeout=5)


@pytest.fixture
def killed_when():
    """killed_when(cli_args, marker): run `posterrl cli_args` in a session of its own, wait until the file
    `marker` exists, then SIGKILL the whole session (the driver and the Ray cluster it started)."""

    def run(args: list[str], marker: Path, timeout_s: float = 600) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "posterrl.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout_s
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert marker.exists() and proc.poll() is None, f"{marker} did not appear while `posterrl {args[0]}` ran"
        _kill_session(proc.pid)
        proc.wait()

    return run
