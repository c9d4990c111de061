"""`posterrl reward list|add|swap|remove|set-weight --run RUN_DIR`: change a live run's reward registry.

The command joins the run's Ray cluster (--address, or the address the run wrote to
RUN_DIR/cluster.json), finds the run's named reward server and asks it for the change; the server
loads and probes a new scorer before it goes live and answers with the reason when it refuses.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from rich.console import Console
from rich.table import Table

from actors.cluster import use_token_file
from actors.reward_server import NAMESPACE, find_reward_server
from posterrl.runlog import TOKEN_FILE, RunDirError, read_cluster_file
from reward_server.registry import RegistryError


def cluster_address(run_dir: Path, address: str | None) -> str:
    """--address, or the one the run wrote to RUN_DIR/cluster.json (checked: posterrl/runlog.py); when the
    address is the file's, also the token the file names (a cluster the run started has a token file of its
    own; for a joined cluster, or another --address, the environment's RAY_AUTH_MODE and token are used)."""
    if address:
        try:
            info = read_cluster_file(run_dir)
        except RunDirError:
            return address
        if address != info["address"]:
            return address
    else:
        info = read_cluster_file(run_dir)
    token_file = info.get("token_file")
    if info.get("auth_mode") == "token" and isinstance(token_file, str):
        if not Path(token_file).is_file() and (run_dir / TOKEN_FILE).is_file():
            token_file = str(run_dir / TOKEN_FILE)  # the run directory was moved
        use_token_file(token_file)
    elif info.get("auth_mode") == "token":
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    return info["address"]


def print_registry(console: Console, described: dict) -> None:
    table = Table(title=f"reward registry (server step {described['step']})")
    for column in ("name", "kind", "weight", "status", "version", "path / backend", "fingerprint"):
        table.add_column(column)
    for s in described["scorers"]:
        where = " ".join(str(v) for v in (s["path"], s["backend"], s["url"]) if v) or "-"
        status = s["status"] + (", optional" if s.get("optional") else "")
        table.add_row(s["name"], s["kind"], f"{s['weight']:g}", status, str(s["version"]), where, s["fingerprint"])
    console.print(table)
    stats = described["stats"]
    console.print(f"served {stats['requests']} requests, {stats['samples']} samples in {stats['batches']} batches "
                  f"(mean batch {stats['mean_batch_size']:.1f})")
    for name, kinds in described["failures"].items():  # kind (timeout, error, nonfinite, wrong_length,
        counts = ", ".join(f"{kind} {count}" for kind, count in kinds.items())  # out_of_range) -> count
        console.print(f"[yellow]{name}: dropped scores: {counts}", highlight=False)
    for problem in described["restore_problems"]:
        console.print(f"[yellow]not restored from the journal: {problem}")


CHANGE_TIMEOUT_S = 900.0  # a change loads and probes a model (a VLM judge can take minutes)


def change(method, *args) -> dict:
    """One registry change, not retried by Ray: a change the server journaled just before it died would
    otherwise be applied twice (a second version of the same model)."""
    try:
        return ray.get(method.options(max_task_retries=0).remote(*args), timeout=CHANGE_TIMEOUT_S)
    except GetTimeoutError:
        raise RegistryError(f"the reward server did not answer within {CHANGE_TIMEOUT_S:g} s; see "
                            "`posterrl reward list` for whether the change went in") from None
    except RayActorError as exc:
        raise RegistryError(f"the reward server died during the change ({type(exc).__name__}); it restarts "
                            "from its journal: see `posterrl reward list` for whether the change went in") from None


def run_reward_command(args: argparse.Namespace, console: Console) -> int:
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise RegistryError(f"--run {run_dir}: no such run directory")
    ray.init(address=cluster_address(run_dir, args.address), namespace=NAMESPACE, log_to_driver=False,
             include_dashboard=False)
    try:
        server = find_reward_server(run_dir)
        if args.reward_command == "list":
            print_registry(console, ray.get(server.describe.remote(), timeout=CHANGE_TIMEOUT_S))
            return 0
        if args.reward_command == "add":
            spec = {"name": args.name, "kind": args.kind, "weight": args.weight, "path": args.path,
                    "backend": args.backend, "url": args.url, "api_key_env": args.api_key_env,
                    "optional": args.optional}
            answer = change(server.add, spec)
        elif args.reward_command == "swap":
            answer = change(server.swap, args.name, args.path, args.backend, args.url)
        elif args.reward_command == "remove":
            answer = change(server.remove, args.name)
        else:
            answer = change(server.set_weight, args.name, args.weight)
        if not answer["ok"]:
            console.print(f"[red]refused:[/red] {answer['error']}", highlight=False)
            console.print("the registry is unchanged; the previous scorers keep serving")
            return 1
        s = answer["scorer"]
        console.print(f"{args.reward_command}: {s['name']} ({s['kind']}) version {s['version']}, weight "
                      f"{s['weight']:g}, {'live' if s['weight'] else 'shadow'}", highlight=False)
        return 0
    finally:
        ray.shutdown()

