import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster for the tests of one module."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
