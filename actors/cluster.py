"""Starting or joining the Ray cluster a run lives in."""

from __future__ import annotations

import os

import ray

from posterrl.config import Config


def connect(config: Config, address: str | None = None) -> None:
    """Join `address` (or cluster.address), or start a local cluster sized by cluster.num_cpus."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    address = address or config.cluster.address
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(num_cpus=config.cluster.num_cpus, num_gpus=config.cluster.num_gpus,
                 include_dashboard=False, log_to_driver=True)


def threads_for(num_cpus: float) -> int:
    """Torch threads for an actor holding num_cpus logical CPUs (at least one)."""
    return max(1, int(num_cpus))
