"""Starting or joining the Ray cluster a run lives in.

A cluster the run starts itself uses Ray's token authentication with a fresh token of its own, kept in
RUN_DIR/ray_auth_token (0600); `posterrl reward --run RUN_DIR` finds it through RUN_DIR/cluster.json. A
cluster the run joins (--address / cluster.address) uses whatever RAY_AUTH_MODE and token the environment
gives (docs/security.md).
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import ray
from ray._raylet import AuthenticationTokenLoader
from ray._raylet import Config as RayConfig

from actors.faults import wait_all
from posterrl.config import Config
from posterrl.errors import UserError
from posterrl.runlog import TOKEN_FILE, write_private_file

RAY_ADDRESS_VAR = "RAY_ADDRESS"  # the cluster Ray joins when ray.init gets no address


def use_token_file(path: str | Path) -> None:
    """Make this process (and the Ray processes it starts) present the token in `path`."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # would win over the file
    RayConfig.initialize("")  # Ray caches the mode it read from the environment (as Ray's own ray.init does)
    AuthenticationTokenLoader.instance().reset_cache()  # and a token loaded earlier in this process


def new_run_token(run_dir: str | Path) -> Path:
    """A fresh 256-bit token in RUN_DIR/ray_auth_token (0600), made this process's token."""
    path = Path(run_dir).resolve() / TOKEN_FILE
    write_private_file(path, secrets.token_hex(32))
    use_token_file(path)
    return path


class ClusterError(UserError):
    """The Ray cluster named by --address / cluster.address could not be reached; the message names it."""


def connect(config: Config, address: str | None = None, run_dir: str | Path | None = None) -> bool:
    """Join `address` (or cluster.address), or start a local cluster sized by cluster.num_cpus; a local one
    gets a new token in run_dir (or, without run_dir, Ray's default token handling).

    Without an address the cluster is always a new local one (ray.init(address="local")): Ray would
    otherwise join whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster names, and a head that died
    without `ray stop` leaves that file behind, so the next run failed with "When connecting to an
    existing cluster, num_cpus and num_gpus must not be provided". To join a cluster, pass --address.
    Returns whether this call connected (the caller then disconnects with ray.shutdown()).
    """
    if ray.is_initialized():
        return False
    # Local workers inherit this: transformers' import-time notices (a missing torchvision) would repeat per actor.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    address = address or config.cluster.address
    if address:
        refused = unreachable(address)
        if refused:  # at once: Ray itself retries a dead GCS address for about 90 s before it says so
            raise ClusterError(f"cannot reach the Ray cluster at --address {address}: {refused}")
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as exc:
            raise ClusterError(f"cannot reach the Ray cluster at --address {address}: {exc}") from None
        return True
    if run_dir is not None:
        new_run_token(run_dir)
    os.environ.pop(RAY_ADDRESS_VAR, None)  # names another cluster: not for this run's processes either
    ray.init(address="local", num_cpus=config.cluster.num_cpus, num_gpus=config.cluster.num_gpus,
             include_dashboard=config.cluster.dashboard, dashboard_host=config.cluster.dashboard_host,
             log_to_driver=True)
    return True


def unreachable(address: str, timeout_s: float = 10.0) -> str | None:
    """Why a host:port address takes no TCP connection (None when it does, or for other forms: auto, ray://)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return f"no Ray head listens there ({type(exc).__name__}: {exc})"
    return None


def auth_info() -> dict[str, str | None]:
    """How a client authenticates to the cluster this process is connected to: for cluster.json."""
    token = os.environ.get("RAY_AUTH_TOKEN_PATH") if not os.environ.get("RAY_AUTH_TOKEN") else None
    return {"auth_mode": os.environ.get("RAY_AUTH_MODE", "disabled").lower(),
            "token_file": str(Path(token).resolve()) if token else None}


def _node_of_actor(actor: object) -> tuple[str, str]:
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def rendezvous_host(actors: list, timeout_s: float) -> str:
    """Where actors[0] should listen for the others (a process group's store): 127.0.0.1 when every actor
    runs on its node, else its node's IP as Ray reports it (never all interfaces)."""
    nodes = wait_all([actor.__ray_call__.remote(_node_of_actor) for actor in actors], timeout_s,
                     [f"actor {i} of the process group" for i in range(len(actors))])
    return "127.0.0.1" if all(node == nodes[0][0] for node, _ in nodes) else nodes[0][1]


def threads_for(num_cpus: float) -> int:
    """Torch threads for an actor holding num_cpus logical CPUs (at least one)."""
    return max(1, int(num_cpus))
