"""Names of the files a learner checkpoint folder holds, shared by the learner and the driver, and the
checked reader of its `latest.json`.

Kept apart from learner/ so the driver can find a checkpoint without importing DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posterrl.errors import UserError
from posterrl.files import write_atomic

LATEST_FILE = "latest.json"  # {"tag": "step_NNNNNNN", "step": N}: the newest complete checkpoint


class CheckpointError(UserError):
    """A checkpoint folder whose latest.json is missing, torn or points nowhere, or with no step folder whose
    files match its checkpoint.json; the message names the file."""


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


# ---------------------------------------------------------------------- the manifest of one checkpoint folder

MANIFEST_FILE = "checkpoint.json"  # {"files": {name: {"size": N, "sha256": HEX}}}: written last, by rank 0
STEP_PREFIX = "step_"


def step_of(tag: str) -> int | None:
    """N of a `step_N` folder name, None for any other name."""
    digits = tag[len(STEP_PREFIX):]
    return int(digits) if tag.startswith(STEP_PREFIX) and digits.isdigit() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint_manifest(folder: str | Path) -> Path:
    """FOLDER/checkpoint.json: name, size and sha256 of every file in the folder (once every rank has written)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    return write_atomic(folder / MANIFEST_FILE, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_problem(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder against its manifest (a file missing, another size or
    sha256), or None when it is complete. A folder without checkpoint.json is incomplete (a crash mid-save)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return f"{path} does not exist (the save did not finish)"
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"{path} is torn or not a checkpoint manifest ({type(exc).__name__}: {exc})"
    for name, size, sha in entries:
        file = folder / name
        if not file.is_file():
            return f"{file} is missing (listed in {path})"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {path} says {size}"
        if _sha256(file) != sha:
            return f"{file} does not match its sha256 in {path} (damaged or changed after the save)"
    return None


def usable_checkpoint(directory: str | Path, report: Callable[[str], None] = print) -> str:
    """The tag to resume from: latest.json's when its files check out against their manifest, else the newest
    complete step_N folder before it (reported through `report`); CheckpointError naming the damage when none is.

    A latest.json target without checkpoint.json was written before manifests existed: loaded unchecked.
    """
    root = Path(directory)
    latest = read_latest(root)
    tag = latest["tag"]
    if not (root / tag / MANIFEST_FILE).exists():
        report(f"{root / tag}: no {MANIFEST_FILE} (saved by an older posterrl), loaded without checking its files")
        return tag
    problem = checkpoint_problem(root / tag)
    if problem is None:
        return tag
    problems = [problem]
    current = step_of(tag)
    older = sorted(((s, p.name) for p in root.iterdir() if p.is_dir() and (s := step_of(p.name)) is not None
                    and p.name != tag and (current is None or s < current)), reverse=True)
    for _, candidate in older:
        other = checkpoint_problem(root / candidate)
        if other is None:
            report(f"checkpoint {root / tag} is damaged: {problem}; resuming from the previous complete one, "
                   f"{root / candidate}")
            return candidate
        problems.append(other)
    raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(problems)}; delete {root} to start the "
                          "stage over")
