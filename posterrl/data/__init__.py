"""Poster data: procedural posters, the six tasks, manifests and the gold metric."""

from posterrl.data.gold import gold_details, gold_metric
from posterrl.data.manifest import (
    ManifestError,
    ManifestLoad,
    ManifestRow,
    load_manifest,
    summarize_skips,
    write_manifest,
)
from posterrl.data.sheet import contact_sheet, task_counts
from posterrl.data.tasks import REGIME, TASKS, TaskSample, build_samples, generate_dataset, write_samples

__all__ = [
    "REGIME",
    "TASKS",
    "ManifestError",
    "ManifestLoad",
    "ManifestRow",
    "TaskSample",
    "build_samples",
    "contact_sheet",
    "generate_dataset",
    "gold_details",
    "gold_metric",
    "load_manifest",
    "summarize_skips",
    "task_counts",
    "write_manifest",
    "write_samples",
]
