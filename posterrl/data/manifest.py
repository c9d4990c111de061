"""Manifest JSONL: one sample per line, bad rows skipped and accounted for.

A row is {"id": str, "task": one of TASKS, "instruction": str, "inputs": [image path, ...],
"target": image path (optional), "meta": object (optional)}. Image paths are relative to the
manifest's folder or absolute. Users bring their own data this way, so every rejected row keeps a
reason that names its line and the problem.
"""

from __future__ import annotations

import difflib
import json
import math
import warnings
from collections.abc import Iterable, Iterator
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
        with warnings.catch_warnings():
            # Above Image.MAX_IMAGE_PIXELS PIL only warns (an error from twice that): either way a row whose
            # header claims such a size is a decompression bomb, or at least no poster, and is skipped here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"is too large to open ({error})"
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not an image"
        return f"is not a readable image ({error})"
    return None


def _aspect_problem(value: object) -> str | None:
    """meta.target_aspect, when present, is [width, height]: two finite numbers > 0 (rescaling: the output's
    aspect; a 0 or a string here would divide by zero or fail inside a rollout actor mid-run)."""
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in value)):
        return None
    return f"'meta.target_aspect' must be [width, height], two numbers > 0, got {json.dumps(value)}"


def _parse_row(record: object, root: Path, require_target: bool, check_images: bool,
               image_problems: dict[Path, str | None], max_inputs: int | None) -> ManifestRow:
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
    if max_inputs is not None and len(inputs) > max_inputs:
        raise _BadRow(f"{len(inputs)} input images, more than model.max_inputs={max_inputs}")
    target = record.get("target")
    if target is not None and (not isinstance(target, str) or not target):
        raise _BadRow(f"'target' must be an image path, got {type(target).__name__}")
    meta = record.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _BadRow(f"'meta' must be a JSON object, got {type(meta).__name__}")
    if "target_aspect" in meta:
        problem = _aspect_problem(meta["target_aspect"])
        if problem:
            raise _BadRow(problem)

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


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (a leading byte-order mark is dropped); ManifestError naming the
    file and line at the first byte that is not UTF-8 (an image or a spreadsheet passed as the manifest)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ManifestError(f"manifest {path} line {number} is not UTF-8 text ({error.reason} at byte "
                                    f"{error.start} of the line): a manifest is JSON lines in UTF-8") from None


def load_manifest(path: str | Path, require_target: bool = False, check_images: bool = True,
                  max_inputs: int | None = None) -> ManifestLoad:
    """Read a manifest, skipping and counting bad rows; raise ManifestError when none is usable.

    max_inputs: rows with more input images are skipped too (model.max_inputs, where the model is known).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    root = path.parent
    rows: list[ManifestRow] = []
    reasons: list[str] = []
    first_line_of_id: dict[str, int] = {}
    image_problems: dict[Path, str | None] = {}  # an image shared by many rows is checked once
    for line_number, line in _text_lines(path):
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
            row = _parse_row(record, root, require_target, check_images, image_problems, max_inputs)
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


def check_bad_fraction(load: ManifestLoad, max_fraction: float, key: str = "data.max_bad_fraction") -> None:
    """ManifestError, with the counts and the first reasons, when more than `max_fraction` of the manifest's
    rows were skipped: so many bad rows usually mean a wrong file or image folder, so the run stops before
    any training instead of carrying on with what is left."""
    if load.total and load.skipped / load.total > max_fraction:
        raise ManifestError(f"manifest {load.path or ''}: {load.skipped} of {load.total} rows are bad "
                            f"({load.skipped / load.total:.0%}), more than {key}={max_fraction:g}; fix the manifest, "
                            f"or raise {key} to go on with the {len(load.rows)} good rows; first reasons:\n"
                            + _reasons_block(load.reasons, REASONS_SHOWN_IN_ERRORS))


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
