"""The run directory: resolved config, TensorBoard, checkpoints and the machine-readable summary.

    <run_dir>/config.yaml     the resolved config the run used
    <run_dir>/tb/             TensorBoard event files
    <run_dir>/checkpoints/    <stage>/ exported policies (diffusers layout), DeepSpeed states
    <run_dir>/data/           generated data (unless data.dir points elsewhere)
    <run_dir>/summary.json    per stage figures, per task gold metrics
    <run_dir>/cluster.json    the Ray address of the running job (written by its reward server) for
                              `posterrl reward ...`, with its auth mode and token file
    <run_dir>/ray_auth_token  the Ray token of a cluster the run started itself (mode 0600)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from posterrl.config import Config
from posterrl.errors import UserError
from posterrl.files import write_atomic

CLUSTER_FILE = "cluster.json"  # where a run says which Ray cluster it lives in, for `posterrl reward`
TOKEN_FILE = "ray_auth_token"  # the Ray token of a cluster the run started (owner-only, 0600)


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600 from creation on), crash-safe (write_atomic)."""
    write_atomic(path, text, mode=0o600)


class RunDirError(UserError):
    """A run directory, or a file in it, that is not what a command needs; the message names the path."""


def read_cluster_file(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/cluster.json, checked: a JSON object with a non-empty string "address"."""
    path = Path(run_dir) / CLUSTER_FILE
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: the run has not started its reward server yet, or --run is not "
                          "a run directory; pass --address ADDR to name the Ray cluster")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is empty or torn ({type(exc).__name__}: {exc}): the run may not be running "
                          "(or is starting right now); check the run, or pass --address ADDR") from None
    if not isinstance(info, dict) or not isinstance(info.get("address"), str) or not info["address"]:
        raise RunDirError(f"{path} holds no Ray address (expected a JSON object with \"address\"): the run may "
                          "not be running; check the run, or pass --address ADDR")
    return info


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        out = {f"{prefix}.length": len(value)}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def config_differences(saved: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ("stages",)) -> list[str]:
    """`key: saved -> new` for every dotted key whose value differs (missing on one side: <unset>)."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    unset = "<unset>"
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key.split(".")[0].split("[")[0] in ignore:
            continue
        before, after = old_flat.get(key, unset), new_flat.get(key, unset)
        if before != after:
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tb = self.root / "tb"
        self.checkpoints = self.root / "checkpoints"
        self.summary_path = self.root / "summary.json"
        self.config_path = self.root / "config.yaml"

    def create(self, config: Config) -> RunDir:
        for d in (self.root, self.tb, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
        if not self.summary_path.exists():
            self.write_summary({"run_dir": str(self.root), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "stages": {}, "gold": {}})
        return self

    def config_changes(self, config: Config) -> list[str]:
        """How `config` differs from the run's saved config.yaml (read through load_config, so keys that moved
        compare by their new names), the stage list aside: `posterrl sft|distill|rl` each set their own."""
        if not self.config_path.is_file():
            return []
        from posterrl.config import load_config

        return config_differences(load_config(self.config_path).to_dict(), config.to_dict())

    def data_dir(self, config: Config) -> Path:
        return Path(config.data.dir) if config.data.dir else self.root / "data"

    def stage_checkpoint(self, stage: str) -> Path:
        return self.checkpoints / stage

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {"stages": {}, "gold": {}}

    def write_summary(self, summary: dict[str, Any]) -> None:
        # a crash never leaves a half-written summary (posterrl/files.py)
        write_atomic(self.summary_path, json.dumps(summary, indent=2, sort_keys=False) + "\n")

    def record_stage(self, stage: str, figures: dict[str, Any]) -> None:
        summary = self.summary()
        summary.setdefault("stages", {})[stage] = figures
        self.write_summary(summary)

    def record_gold(self, label: str, per_task: dict[str, float]) -> None:
        """One row of the gold-metric table (rows: policies, columns: tasks and the mean)."""
        self._record_row("gold", label, per_task)

    def record_reward(self, label: str, per_task: dict[str, float]) -> None:
        """One row of the learned-reward table: the served reward of the same held-out samples."""
        self._record_row("reward", label, per_task)

    def record_known_psnr(self, label: str, per_task: dict[str, float]) -> None:
        """One row of the preservation table: PSNR of the known region against the input (extending, filling)."""
        self._record_row("known_region_psnr", label, per_task)

    def _record_row(self, table: str, label: str, per_task: dict[str, float]) -> None:
        summary = self.summary()
        summary.setdefault(table, {})[label] = per_task
        self.write_summary(summary)
