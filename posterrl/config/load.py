"""Loading a run configuration: YAML, dotted CLI overrides, the keys older versions used, error messages.

Every problem is reported before Ray or any model starts: errors name the file, the key path, the bad
value and what was expected, and suggest the nearest key for a typo.

Keys that moved keep working for now: `migrate_legacy_keys` (on the file, before overrides) and
`apply_overrides` (on each override) rewrite them to their new place and say so once each with a
`ConfigDeprecationWarning` (a FutureWarning, so Python shows it by default; the CLI prints it in yellow).
An old key and its new key both given with different values is an error naming both.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posterrl.config.schema import Config
from posterrl.errors import UserError


class ConfigError(UserError):
    """A config that cannot run; the message lists every problem found."""


class ConfigDeprecationWarning(FutureWarning):
    """A config key that moved; the config was migrated and runs as before."""


# Old key -> its new keys (a value given under the old key goes to every new one). A section moves whole:
# reward.bt.X -> reward_model.X.
LEGACY_KEYS: dict[str, tuple[str, ...]] = {
    "learner.sft_steps": ("sft.steps",),
    "learner.distill_steps": ("distill.steps",),
    "learner.lr": ("sft.lr", "distill.lr"),
    "learner.batch_size": ("sft.batch_size", "distill.batch_size"),
    "learner.lambda_expert": ("distill.lambda_expert",),
    "learner.distill_init": ("distill.init",),
    "learner.eval_every": ("sft.eval_every", "distill.eval_every"),
    "learner.checkpoint_every": ("sft.checkpoint_every", "distill.checkpoint_every"),
    "reward.bt": ("reward_model",),
}

_MISSING = object()


def _deprecated(where: str, old: str, new: tuple[str, ...]) -> None:
    warnings.warn(f"{where}: {old} is deprecated, use {' and '.join(new)} (migrated)", ConfigDeprecationWarning,
                  stacklevel=3)


def _lookup(raw: dict, key: str) -> tuple[dict | None, Any]:
    """(parent mapping, value) at a dotted key; value is _MISSING when absent or under a non-mapping."""
    *parents, last = key.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return None, _MISSING
    return node, node[last]


def _put(raw: dict, key: str, value: Any, old: str, source: str) -> None:
    """Set `key` to a migrated value; a value already there must agree (mappings merge key by key)."""
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return  # not a section: validation reports it
        node = child
    present = node.get(last, _MISSING)
    if isinstance(present, dict) and isinstance(value, dict):
        for sub, sub_value in value.items():
            _put(raw, f"{key}.{sub}", sub_value, f"{old}.{sub}", source)
    elif present is _MISSING:
        node[last] = value
    elif present != value:
        raise ConfigError(f"{source}: {old}={value!r} and {key}={present!r} disagree; {old} is deprecated, "
                          f"keep only {key}")


def migrate_legacy_keys(raw: dict, source: str) -> dict:
    """A copy of `raw` with every key of LEGACY_KEYS moved to its new place, one warning per key moved."""
    out = copy.deepcopy(raw)
    for old, new in LEGACY_KEYS.items():
        parent, value = _lookup(out, old)
        if parent is None:
            continue
        del parent[old.rsplit(".", 1)[-1]]
        for key in new:
            _put(out, key, copy.deepcopy(value), old, source)
        _deprecated(source, old, new)
    return out


def legacy_targets(parts: list[str]) -> tuple[str, list[list[str]]] | None:
    """For a key path under an old key: (the old key, the new key paths it stands for); None otherwise."""
    for old, new in LEGACY_KEYS.items():
        old_parts = old.split(".")
        if parts[: len(old_parts)] == old_parts:
            return old, [key.split(".") + parts[len(old_parts):] for key in new]
    return None


# ---------------------------------------------------------------- overrides


# One step of an override's key path: a key, then any list indices, e.g. `scorers[0]`.
_KEY_STEP = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def _steps(parts: list[str]) -> list[str | int]:
    """['reward', 'scorers[0]', 'weight'] -> ['reward', 'scorers', 0, 'weight'] (a part that is all digits is an
    index too: reward.scorers.0.weight)."""
    steps: list[str | int] = []
    for part in parts:
        match = _KEY_STEP.fullmatch(part)
        assert match is not None  # parse_overrides checked every part
        key, indices = match.groups()
        steps.append(int(key) if key.isdigit() else key)
        steps += [int(i) for i in re.findall(r"\d+", indices)]
    return steps


def _key_text(steps: list[str | int] | tuple) -> str:
    """('reward', 'scorers', 0, 'weight') -> 'reward.scorers[0].weight'."""
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. sft.lr=1e-4")
        key, raw = item.split("=", 1)
        if not key or any(not _KEY_STEP.fullmatch(p) for p in key.split(".")):
            raise ConfigError(f"override {item!r}: malformed key path {key!r} (dotted keys, list entries as "
                              "reward.scorers[0].weight)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with the dotted overrides applied in order; old keys are moved to their new place."""
    out = copy.deepcopy(raw)
    planned: list[tuple[list[str], Any]] = []
    direct: dict[tuple[str, ...], tuple[str, Any]] = {}  # new key path -> (override, value)
    migrated: dict[tuple[str, ...], tuple[str, str, Any]] = {}  # new key path -> (override, old key, value)
    moves: list[tuple[str, str, tuple[str, ...]]] = []  # (override, old key path, new key paths)
    for item, (parts, value) in zip(overrides, parse_overrides(overrides), strict=True):
        legacy = legacy_targets(parts)
        if legacy is None:
            planned.append((parts, value))
            direct[tuple(parts)] = (item, value)
            continue
        old, targets = legacy
        moves.append((item, ".".join(parts), tuple(".".join(t) for t in targets)))
        for target in targets:
            planned.append((target, value))
            migrated[tuple(target)] = (item, old, value)
    for path, (item, old, value) in migrated.items():
        if path in direct and direct[path][1] != value:
            raise ConfigError(f"overrides {item} and {direct[path][0]} disagree; {old} is deprecated, "
                              f"keep only {'.'.join(path)}")
    for item, old_key, new_keys in moves:
        _deprecated(f"override {item}", old_key, new_keys)
    for parts, value in planned:
        steps = _steps(parts)
        node: Any = out
        for depth, step in enumerate(steps):
            last = depth == len(steps) - 1
            where = f"override {'.'.join(parts)}: {_key_text(steps[: depth + 1])!r}"
            if isinstance(step, int):
                if not isinstance(node, list):
                    raise ConfigError(f"{where} indexes {_key_text(steps[:depth]) or 'the config'}, "
                                      "which is not a list")
                if step >= len(node):
                    raise ConfigError(f"{where}: {_key_text(steps[:depth])} has {len(node)} entries "
                                      f"(indices 0..{len(node) - 1})")
            elif not isinstance(node, dict):
                raise ConfigError(f"{where}: {_key_text(steps[:depth])!r} is not a section")
            if last:
                node[step] = value
                break
            child = node[step] if isinstance(step, int) else node.get(step)
            if child is None and isinstance(step, str):
                child = node[step] = [] if isinstance(steps[depth + 1], int) else {}
            node = child
    return out


# ---------------------------------------------------------------- errors


def _known_keys(model_cls: type[BaseModel], path: tuple) -> list[str]:
    """Field names of the section at `path` (for typo suggestions)."""
    cls: Any = model_cls
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            cls = inner[0]  # list[Section]
        else:
            return []
    return list(cls.model_fields)


def _suggestion(loc: tuple, known: list[str]) -> str:
    """'; did you mean ...?' for an unknown key: the nearest key of its section, or where a moved key went."""
    section = [str(p) for p in loc[:-1]]
    moved = {old.split(".")[-1]: new for old, new in LEGACY_KEYS.items() if old.split(".")[:-1] == section}
    close = difflib.get_close_matches(str(loc[-1]), [*known, *moved], n=1, cutoff=0.5)
    if not close:
        return ""
    if close[0] in moved:
        old, new = ".".join([*section, close[0]]), moved[close[0]]
        return f"; did you mean '{new[0]}'? ({old} moved to {' and '.join(new)})"
    return f"; did you mean '{_key_text([*loc[:-1], close[0]])}'?"


def _format_error(err: Any, source: str) -> str:
    loc = tuple(err["loc"])
    key = _key_text(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(Config, loc[:-1])
        where = _key_text(loc[:-1]) or "the top level"
        return f"{source}: unknown key '{key}'{_suggestion(loc, known)} (known keys in {where}: {', '.join(known)})"
    if kind == "value_error" and not loc:
        return f"{source}: {err['msg'].removeprefix('Value error, ')}"
    got = err.get("input")
    return f"{source}: {key}: got {got!r}, expected {_expected(err)}"


def _expected(err: Any) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind == "finite_number":
        return "a finite number (not .nan or .inf)"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"a number {op} {bound}"
    return err["msg"][0].lower() + err["msg"][1:]


# ---------------------------------------------------------------- entry points


def validate_dict(raw: Any, source: str = "config") -> Config:
    """A Config from a mapping of sections (old keys migrated), or a ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    raw = migrate_legacy_keys(raw, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e, source) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if isinstance(raw, dict):
        raw = migrate_legacy_keys(raw, str(path))  # before the overrides, so an override of a new key wins
    source = str(path) + (f" with overrides {overrides}" if overrides else "")
    if overrides and not isinstance(raw, (dict, type(None))):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return validate_dict(apply_overrides(raw or {}, overrides or []), source)
