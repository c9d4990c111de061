"""The data stage on the cluster: poster generation split into Ray tasks, one manifest per split."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ray

from actors.context import PipelineContext
from actors.faults import wait_all
from posterrl.data.manifest import ManifestLoad, check_bad_fraction, load_manifest, summarize_skips, write_manifest
from posterrl.data.sheet import task_counts
from posterrl.data.tasks import build_samples, write_samples


def _generate_chunk(out_dir: str, start: int, stop: int, seed: int, size: int, split: str,
                    tasks: list[str]) -> list[dict]:
    rows: list[dict] = []
    for index in range(start, stop):
        rows.extend(write_samples(build_samples(index, seed, size, tasks=tuple(tasks), split=split), out_dir))
    return rows


def generate_split(out_dir: Path, split: str, start: int, n: int, seed: int, size: int, tasks: list[str],
                   chunks: int, wait: Callable[[list[ray.ObjectRef]], None] | None = None,
                   timeout_s: float = 600.0) -> Path:
    """Posters start..start+n-1 as Ray tasks; rows are written in index order whatever finishes first.

    Each poster is a pure function of (seed, index), so the result equals one sequential pass.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    remote_chunk = ray.remote(num_cpus=0.5)(_generate_chunk)
    bounds = [start + n * i // chunks for i in range(chunks + 1)]
    refs = [remote_chunk.remote(str(out_dir), a, b, seed, size, split, tasks)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if wait is not None:  # e.g. with a progress bar; ray.get below waits in any case
        wait(refs)
    shares = wait_all(refs, timeout_s, [f"data: generating {split} chunk {i}" for i in range(len(refs))])
    rows = [row for chunk_rows in shares for row in chunk_rows]
    manifest = out_dir / "manifest.jsonl"
    write_manifest(rows, manifest)
    stamp = {"split": split, "start": start, "n": n, "seed": seed, "size": size, "tasks": tasks, "rows": len(rows)}
    (out_dir / "generated.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return manifest


def is_generated(out_dir: Path, split: str, start: int, n: int, seed: int, size: int, tasks: list[str]) -> bool:
    """True when out_dir already holds exactly this split (lets --resume skip regeneration)."""
    stamp_path = out_dir / "generated.json"
    if not stamp_path.is_file() or not (out_dir / "manifest.jsonl").is_file():
        return False
    stamp = json.loads(stamp_path.read_text())
    want = {"split": split, "start": start, "n": n, "seed": seed, "size": size, "tasks": tasks}
    return all(stamp.get(k) == v for k, v in want.items())


def load_split(ctx: PipelineContext, path: str | Path) -> ManifestLoad:
    """A split's rows: bad ones (rows with more inputs than the model takes among them) skipped, counted and
    reported; more than data.max_bad_fraction of them stops the run here, before any training."""
    load = load_manifest(path, require_target=True, max_inputs=ctx.config.model.max_inputs)
    if load.skipped:
        ctx.console.print(f"[yellow]{summarize_skips(load)}")
    check_bad_fraction(load, ctx.config.data.max_bad_fraction)
    return load


def run_data(ctx: PipelineContext) -> dict[str, Any]:
    d = ctx.config.data
    if d.train_manifest:
        figures: dict[str, Any] = {"source": "user manifests"}
        for split, path in (("train", d.train_manifest), ("val", d.val_manifest or d.train_manifest)):
            load = load_split(ctx, path)
            ctx.rows[split] = load.rows
            figures[split] = {"rows": len(load.rows), "skipped": load.skipped, "per_task": task_counts(load.rows)}
        return figures

    root = ctx.run.data_dir(ctx.config)
    figures = {"source": "generated", "dir": str(root), "seed": d.seed, "size": d.size}
    # Held-out posters take the indices after the training ones: same generator, disjoint posters.
    # Reward-stage posters come after both, so none of them is a training or held-out poster.
    splits = [("train", 0, d.n_train), ("val", d.n_train, d.n_val)]
    if d.n_reward:
        splits.append(("reward", d.n_train + d.n_val, d.n_reward))
    for split, start, n in splits:
        out = root / split
        if is_generated(out, split, start, n, d.seed, d.size, list(d.tasks)):
            ctx.console.print(f"data: {out} already holds this split, kept")
        else:
            generate_split(out, split, start, n, d.seed, d.size, list(d.tasks), min(d.chunks, n),
                           wait=partial(ctx.wait_with_progress, description=f"data: generating {split} ({n} posters)"),
                           timeout_s=ctx.config.cluster.call_timeout_s)
        load = load_split(ctx, out / "manifest.jsonl")
        ctx.rows[split] = load.rows
        figures[split] = {"posters": n, "rows": len(load.rows), "skipped": load.skipped,
                          "per_task": task_counts(load.rows)}
    return figures
