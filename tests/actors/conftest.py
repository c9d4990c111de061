import os

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
def kill_session():
    """kill_session(pid of a process started with start_new_session=True): kills its whole session."""
    return _kill_session
