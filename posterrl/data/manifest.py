"""Manifest JSONL: one sample per line, bad rows skipped and accounted for.

A row is {"id": str, "task": one of TASKS, "instruction": str, "inputs": [image path, ...],
"target": image path (optional), "meta": object (optional)}. Image paths are relative to the
manifest's folder or absolute. Users bring their own data this way, so every rejected row keeps a
reason that names its line and the problem.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from posterrl.data.tasks import TASKS
from posterrl.errors import UserError

REASONS_SHOWN_IN_ERRORS = 5


class ManifestError(UserError):
    """The manifest is missing or has no usable row."""


@dataclass
class ManifestRow:
    id: str
    task: str
    instruction: str
    inputs: list[Path]
    target: Path | None
    meta: dict = field(default_factory=dict)

    def load_inputs(self) -> list[Image.Image]:
        return [load_rgb(p) for p in self.inputs]

    def load_target(self) -> Image.Image | None:
        return None if self.target is None else load_rgb(self.target)

    def require_target(self) -> Image.Image:
        """The target image, for code that scores against it (the gold metric); a row without one is an error."""
        if self.target is None:
            raise ManifestError(f"row {self.id!r} ({self.task}) has no target image, which gold scoring needs")
        return load_rgb(self.target)


@dataclass
class ManifestLoad:
    rows: list[ManifestRow]
    skipped: int
    reasons: list[str]
    path: Path | None = None  # the manifest file, for messages

    @property
    def total(self) -> int:
        return len(self.rows) + self.skipped


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class _BadRow(Exception):
    pass


def _image_problem(path: Path) -> str | None:
    if not path.is_file():
        return "does not exist"
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not an image"
        return f"is not a readable image ({error})"
    return None


def _parse_row(record: object, root: Path, require_target: bool, check_images: bool,
               image_problems: dict[Path, str | None]) -> ManifestRow:
    if not isinstance(record, dict):
        raise _BadRow(f"row is a JSON {type(record).__name__}, not an object")
    for key in ("id", "task", "instruction", "inputs") + (("target",) if require_target else ()):
        if key not in record or record[key] is None:
            raise _BadRow(f"missing key {key!r}")
    for key in ("id", "task", "instruction"):
        if not isinstance(record[key], str):
            raise _BadRow(f"{key!r} must be a string, got {type(record[key]).__name__}")
    if not record["id"]:
        raise _BadRow("'id' is empty")
    task = record["task"]
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _BadRow(f"unknown task {task!r}{hint}; known tasks: {', '.join(TASKS)}")
    inputs = record["inputs"]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(p, str) and p for p in inputs):
        got = type(inputs).__name__ if not isinstance(inputs, list) else "an empty or non-string list"
        raise _BadRow(f"'inputs' must be a non-empty list of image paths, got {got}")
    target = record.get("target")
    if target is not None and (not isinstance(target, str) or not target):
        raise _BadRow(f"'target' must be an image path, got {type(target).__name__}")
    meta = record.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _BadRow(f"'meta' must be a JSON object, got {type(meta).__name__}")

    labelled = [(f"input image {p!r}", p) for p in inputs] + ([(f"target image {target!r}", target)] if target else [])
    resolved: list[Path] = []
    for label, raw in labelled:
        path = Path(raw) if Path(raw).is_absolute() else root / raw
        if check_images:
            if path not in image_problems:
                image_problems[path] = _image_problem(path)
            if image_problems[path] is not None:
                raise _BadRow(f"{label} {image_problems[path]}")
        resolved.append(path)
    return ManifestRow(id=record["id"], task=task, instruction=record["instruction"],
                       inputs=resolved[: len(inputs)], target=resolved[len(inputs)] if target else None, meta=meta)


def load_manifest(path: str | Path, require_target: bool = False, check_images: bool = True) -> ManifestLoad:
    """Read a manifest, skipping and counting bad rows; raise ManifestError when none is usable."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    root = path.parent
    rows: list[ManifestRow] = []
    reasons: list[str] = []
    first_line_of_id: dict[str, int] = {}
    image_problems: dict[Path, str | None] = {}  # an image shared by many rows is checked once
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                reasons.append(f"{where}: invalid JSON ({error.msg} at column {error.colno})")
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                where += f" (id {record['id']!r})"
            try:
                row = _parse_row(record, root, require_target, check_images, image_problems)
            except _BadRow as problem:
                reasons.append(f"{where}: {problem}")
                continue
            if row.id in first_line_of_id:
                reasons.append(f"{where}: duplicate id {row.id!r} (first seen on line {first_line_of_id[row.id]})")
                continue
            first_line_of_id[row.id] = line_number
            rows.append(row)
    load = ManifestLoad(rows=rows, skipped=len(reasons), reasons=reasons, path=path)
    if not rows:
        if not reasons:
            raise ManifestError(f"manifest {path} has no rows")
        raise ManifestError(f"manifest {path} has no usable row ({load.skipped} skipped); first reasons:\n"
                            + _reasons_block(reasons, REASONS_SHOWN_IN_ERRORS))
    return load


def write_manifest(rows: Iterable[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def summarize_skips(load: ManifestLoad, limit: int = 5) -> str:
    """'skipped 3 of 20 rows in FILE; first reasons:' followed by up to `limit` reasons, one a line."""
    text = f"skipped {load.skipped} of {load.total} rows in {load.path or 'the manifest'}"
    if not load.reasons:
        return text
    return f"{text}; first reasons:\n{_reasons_block(load.reasons, limit)}"


def _reasons_block(reasons: list[str], limit: int) -> str:
    shown = reasons[:limit]
    more = len(reasons) - len(shown)
    return "\n".join(f"  - {reason}" for reason in shown) + (f"\n  ... and {more} more" if more else "")
