import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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
