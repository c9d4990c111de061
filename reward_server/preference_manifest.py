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


def _path(root: Path, value: object, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise _BadRow(f"'{key}' must be an image path (a non-empty string), got {value!r}")
    return Path(value) if Path(value).is_absolute() else root / value


def _image(root: Path, value: object, key: str):
    path = _path(root, value, key)
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
    chosen, rejected = _path(root, record["chosen"], "chosen"), _path(root, record["rejected"], "rejected")
    if chosen.resolve() == rejected.resolve():
        raise _BadRow(f"'chosen' and 'rejected' are the same image {chosen}: the pair prefers nothing")
    return PreferencePair(
        pair_id=str(record["id"]), task=record["task"], instruction=record["instruction"],
        inputs=[_image(root, v, f"inputs[{i}]") for i, v in enumerate(inputs)],
        chosen=_image(root, record["chosen"], "chosen"), rejected=_image(root, record["rejected"], "rejected"),
        tie=tie, source="manifest", gold_margin=None)


def load_preference_manifest(path: str | Path) -> tuple[list[PreferencePair], int, list[str]]:
    """(pairs, number of skipped rows, one reason per skipped row naming the file and line).

    A manifest without a single usable pair is a ManifestError (with the first reasons): the reward stage
    stops there instead of training on the policy's pairs alone as if the file had been read.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"preference manifest {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad_line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ManifestError(f"preference manifest {path}:{bad_line}: not UTF-8 text ({exc.reason}); a manifest is "
                            "JSON lines in UTF-8") from None
    pairs: list[PreferencePair] = []
    reasons: list[str] = []
    first_line_of_id: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            reasons.append(f"{path}:{number}: not valid JSON ({exc.msg})")
            continue
        try:
            pair = _parse(record, path.parent)
        except _BadRow as bad:
            reasons.append(f"{path}:{number}: {bad}")
            continue
        if pair.pair_id in first_line_of_id:
            reasons.append(f"{path}:{number}: duplicate id {pair.pair_id!r} (first seen on line "
                           f"{first_line_of_id[pair.pair_id]})")
            continue
        first_line_of_id[pair.pair_id] = number
        pairs.append(pair)
    if not pairs:
        shown = "".join(f"\n  - {reason}" for reason in reasons[:5])
        raise ManifestError(f"preference manifest {path} has no usable pair ({len(reasons)} rows skipped)"
                            + (f"; first reasons:{shown}" if shown else ""))
    return pairs, len(reasons), reasons
