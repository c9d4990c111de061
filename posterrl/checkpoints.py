"""Names of the files a learner checkpoint folder holds, shared by the learner and the driver, and the
checked reader of its `latest.json`.

Kept apart from learner/ so the driver can find a checkpoint without importing DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posterrl.errors import UserError

LATEST_FILE = "latest.json"  # {"tag": "step_NNNNNNN", "step": N}: the newest complete checkpoint


class CheckpointError(UserError):
    """A checkpoint folder whose latest.json is missing, torn or points nowhere; the message names the file."""


def read_latest(directory: str | Path) -> dict[str, Any]:
    """DIRECTORY/latest.json, checked: {"tag": a step folder that exists, "step": an int >= 0}."""
    path = Path(directory) / LATEST_FILE
    expected = 'expected {"tag": "step_NNNNNNN", "step": N}'
    fix = (f"to resume, write the newest step_N folder of {path.parent} and its step into it, or delete "
           f"{path.parent} to start the stage over")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {path.parent} holds no complete checkpoint to resume from")
    try:
        latest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is empty or torn ({type(exc).__name__}: {exc}); {expected}; {fix}") from None
    if not isinstance(latest, dict):
        raise CheckpointError(f"{path} holds a JSON {type(latest).__name__}; {expected}; {fix}")
    tag, step = latest.get("tag"), latest.get("step")
    if not isinstance(tag, str) or not tag or Path(tag).name != tag:
        raise CheckpointError(f"{path}: \"tag\" is {tag!r}; {expected}; {fix}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: \"step\" is {step!r}; {expected}; {fix}")
    if not (path.parent / tag).is_dir():
        raise CheckpointError(f"{path} names {tag!r}, but {path.parent / tag} does not exist; {fix}")
    return latest


def latest_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """read_latest, or None when the folder holds no latest.json (nothing saved yet: start from the beginning)."""
    return read_latest(directory) if (Path(directory) / LATEST_FILE).is_file() else None
