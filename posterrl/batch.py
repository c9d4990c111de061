"""Manifest rows -> tensors the policy takes, shared by rollouts, evaluation and the learner."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from posterrl.data.manifest import ManifestRow
from posterrl.images import canvas_tensor


@dataclass
class EditBatch:
    """B samples that all have N input images.

    inputs:         (B, N, 3, R, R) letterboxed input canvases in [-1, 1]
    targets:        (B, 3, R, R) letterboxed targets in [-1, 1], or None when rows have no target
    output_aspects: B pairs (w, h): the aspect the output is cropped to
    frame_inputs:   B first inputs as loaded, where a one-input row's input is already in the output's frame
                    (same aspect, not stretched), else None: what model.input_detail adds back to the output
    """

    ids: list[str]
    tasks: list[str]
    instructions: list[str]
    inputs: torch.Tensor
    targets: torch.Tensor | None
    output_aspects: list[tuple[float, float]]
    frame_inputs: list[Image.Image | None]


def on_device(tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to the device in the model's precision (bf16 under DeepSpeed bf16 or a bf16 scorer);
    ids, masks held as integers and image grids only move."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in tensors.items()}


def output_aspect(row: ManifestRow, inputs: Sequence[Image.Image], target: Image.Image | None) -> tuple[float, float]:
    """The aspect of the image to produce: meta's `target_aspect`, else the target's, else the first input's."""
    if "target_aspect" in row.meta:
        w, h = row.meta["target_aspect"]
        return float(w), float(h)
    reference = target if target is not None else inputs[0]
    return float(reference.width), float(reference.height)


def stretched_to(image: Image.Image, aspect: tuple[float, float]) -> Image.Image:
    """`image` resized to `aspect` (w, h), its longer side kept."""
    longest = max(image.size)
    w, h = aspect
    size = (longest, max(1, round(longest * h / w))) if w >= h else (max(1, round(longest * w / h)), longest)
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)


def collate(rows: Sequence[ManifestRow], resolution: int, with_targets: bool = True,
            stretch_rescaled: bool = False) -> EditBatch:
    """Rows (one number of inputs) -> EditBatch on canvases of `resolution`. `stretch_rescaled`
    (model.stretch_rescaled_input): a one-input row whose meta names a target aspect (rescaling) gets its input
    stretched to that aspect before it is letterboxed."""
    counts = {len(r.inputs) for r in rows}
    if len(counts) != 1:
        raise ValueError(f"collate needs rows with one number of inputs, got {sorted(counts)}: bucket them first")
    inputs, targets, aspects, frame_inputs = [], [], [], []
    for row in rows:
        images = row.load_inputs()
        target = row.load_target() if with_targets else None
        aspect = output_aspect(row, images, target)
        in_frame = len(images) == 1 and images[0].width * aspect[1] == images[0].height * aspect[0]
        frame_inputs.append(images[0] if in_frame else None)
        if stretch_rescaled and len(images) == 1 and "target_aspect" in row.meta:
            images = [stretched_to(images[0], aspect)]
        inputs.append(torch.stack([canvas_tensor(im, resolution) for im in images]))
        if target is not None:
            targets.append(canvas_tensor(target, resolution))
        aspects.append(aspect)
    if targets and len(targets) != len(rows):
        raise ValueError("collate: some rows have a target and some do not")
    return EditBatch(
        ids=[r.id for r in rows],
        tasks=[r.task for r in rows],
        instructions=[r.instruction for r in rows],
        inputs=torch.stack(inputs),
        targets=torch.stack(targets) if targets else None,
        output_aspects=aspects,
        frame_inputs=frame_inputs,
    )


def bucket_by_num_inputs(rows: Sequence[ManifestRow], max_batch: int) -> list[list[ManifestRow]]:
    """Split rows into batches of at most max_batch that share a number of inputs, keeping order within a bucket."""
    buckets: dict[int, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        buckets[len(row.inputs)].append(row)
    return [b[i : i + max_batch] for _, b in sorted(buckets.items()) for i in range(0, len(b), max_batch)]
