"""User preference pairs for the Bradley-Terry reward model: a JSONL manifest.

One JSON object per line:
    {"id": "p1", "task": "filling", "instruction": "...", "inputs": ["in0.png"],
     "chosen": "a.png", "rejected": "b.png", "tie": false}
Image paths are relative to the manifest's folder (or absolute). Bad rows are skipped and counted,
each with its line and reason, so one broken row never loses the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from posterrl.data.manifest import ManifestError, load_rgb
from posterrl.data.tasks import TASKS
from posterrl.models.samples import PreferencePair

REQUIRED = ("id", "task", "instruction", "inputs", "chosen", "rejected")


class _BadRow(Exception):
    pass


def _image(root: Path, value: object, key: str):
    if not isinstance(value, str) or not value:
        raise _BadRow(f"'{key}' must be an image path (a non-empty string), got {value!r}")
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise _BadRow(f"'{key}' image {path} does not exist")
    try:
        return load_rgb(path)
    except Exception as exc:  # PIL raises several types for broken files
        raise _BadRow(f"'{key}' image {path} is unreadable ({type(exc).__name__})") from exc


def _parse(record: object, root: Path) -> PreferencePair:
    if not isinstance(record, dict):
        raise _BadRow(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise _BadRow(f"missing keys {missing} (each row needs {list(REQUIRED)})")
    if record["task"] not in TASKS:
        raise _BadRow(f"unknown task {record['task']!r}; expected one of {', '.join(TASKS)}")
    if not isinstance(record["instruction"], str):
        raise _BadRow(f"'instruction' must be a string, got {type(record['instruction']).__name__}")
    inputs = record["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise _BadRow(f"'inputs' must be a non-empty list of image paths, got {inputs!r}")
    tie = record.get("tie", False)
    if not isinstance(tie, bool):
        raise _BadRow(f"'tie' must be true or false, got {tie!r}")
    return PreferencePair(
        pair_id=str(record["id"]), task=record["task"], instruction=record["instruction"],
        inputs=[_image(root, v, f"inputs[{i}]") for i, v in enumerate(inputs)],
        chosen=_image(root, record["chosen"], "chosen"), rejected=_image(root, record["rejected"], "rejected"),
        tie=tie, source="manifest", gold_margin=None)


def load_preference_manifest(path: str | Path) -> tuple[list[PreferencePair], int, list[str]]:
    """(pairs, number of skipped rows, one reason per skipped row naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"preference manifest {path}: no such file")
    pairs, reasons = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            reasons.append(f"{path}:{number}: not valid JSON ({exc.msg})")
            continue
        try:
            pairs.append(_parse(record, path.parent))
        except _BadRow as bad:
            reasons.append(f"{path}:{number}: {bad}")
    return pairs, len(reasons), reasons
