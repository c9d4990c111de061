import atexit
import os
import secrets
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Ray clusters the tests start themselves (ray.init in a fixture) use token auth, as a run's do, with a
# session token of their own: Ray would otherwise make and keep one in ~/.ray/auth_token. `posterrl run`
# subprocesses replace it with their run's token (actors/cluster.py).
_token_dir = tempfile.mkdtemp(prefix="posterrl-test-ray-")
atexit.register(shutil.rmtree, _token_dir, True)
_token_path = os.path.join(_token_dir, "auth_token")
with open(os.open(_token_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as _token:
    _token.write(secrets.token_hex(32))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=_token_path)
os.environ.pop("RAY_AUTH_TOKEN", None)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_config():
    from posterrl.config import load_config

    # Smaller than the tiny default so unit tests stay fast; same classes.
    return load_config("configs/tiny.yaml", ["model.resolution=32", "model.transformer.num_layers=1",
                                             "model.transformer.num_single_layers=1"])


@pytest.fixture(scope="session")
def tiny_policy(tiny_config):
    from posterrl.policy import EditPolicy

    return EditPolicy.from_config(tiny_config.model, tiny_config.rollout).eval()
