"""Gold metric: a programmatic oracle score in [0, 1] per task, from the target and meta only.

No reward model ever sees it; it tells whether RL really improves posters. The building block is
region fidelity exp(-MSE / TAU) on [0, 1] RGB, averaged over full resolution and a 2x box-downsampled
copy, so a blurry-but-right output still earns partial credit. docs/gold_metrics.md lists the
measured scores of targets, corrupted targets and trivial outputs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# MSE at which fidelity falls to 1/e. Pixel noise of sigma 0.05 plus a 1-pixel blur costs about
# 0.005 (fidelity ~0.75); a flat gray or untouched region is >= 0.03 off (fidelity < 0.2).
TAU = 0.02
HISTOGRAM_BINS = 5  # per channel, soft-assigned: coarse enough to ignore noise, fine enough for palettes

ImageLike = Image.Image | np.ndarray

WEIGHTS: dict[str, dict[str, float]] = {
    "extending": {"outpainted": 0.75, "crop": 0.25},
    "filling": {"masked": 0.8, "preserved": 0.2},
    "rescaling": {"elements": 0.6, "global": 0.4},
    "identity-driven": {"entity": 0.7, "global": 0.3},
    "layout-driven": {"boxes": 0.6, "global": 0.4},
    # The unedited input here is the style reference, which shares the palette: content and layout
    # must outweigh the palette statistics to keep it clearly below a faithful output.
    "style-driven": {"palette": 0.15, "texture": 0.1, "content": 0.5, "global": 0.25},
}


def to_array(image: ImageLike) -> np.ndarray:
    """HxWx3 float32 in [0, 1] from a PIL image, a float array in [0, 1] or a uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _resized_to(output: ImageLike, height: int, width: int) -> np.ndarray:
    array = to_array(output)
    if array.shape[:2] == (height, width):
        return array
    # Bilinear per channel in float ("F" mode) so float outputs are not quantized first.
    channels = [Image.fromarray(np.ascontiguousarray(array[..., c]), "F").resize((width, height),
                                                                                 Image.Resampling.BILINEAR)
                for c in range(3)]
    return np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0.0, 1.0)


def _down2(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[0] // 2 * 2, array.shape[1] // 2 * 2
    a = array[:h, :w]
    return 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])


class _Comparison:
    """Per-pixel squared error of output vs target at full and half resolution."""

    def __init__(self, output: np.ndarray, target: np.ndarray):
        self.height, self.width = target.shape[:2]
        self.output, self.target = output, target
        self.errors = [((output - target) ** 2).mean(axis=2), ((_down2(output) - _down2(target)) ** 2).mean(axis=2)]

    def box_mask(self, box: list[float]) -> np.ndarray:
        x0, y0, x1, y1 = box
        mask = np.zeros((self.height, self.width), dtype=np.float32)
        px0, py0 = int(np.floor(x0 * self.width + 1e-6)), int(np.floor(y0 * self.height + 1e-6))
        px1, py1 = int(np.ceil(x1 * self.width - 1e-6)), int(np.ceil(y1 * self.height - 1e-6))
        mask[max(py0, 0):max(py1, py0 + 1), max(px0, 0):max(px1, px0 + 1)] = 1.0
        return mask

    def fidelity(self, mask: np.ndarray | None = None) -> float:
        """exp(-MSE/TAU) over the (weighted) region, averaged over both scales."""
        scores = []
        for scale, error in enumerate(self.errors):
            weight = np.ones_like(error) if mask is None else (mask if scale == 0 else _down2(mask))
            total = float(weight.sum())
            if total < 1e-6:
                continue
            scores.append(np.exp(-float((error * weight).sum()) / total / TAU))
        return float(np.mean(scores)) if scores else 0.0


def soft_histogram(image: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Joint RGB histogram with linear (soft) bin assignment, normalized to sum 1."""
    pixels = image.reshape(-1, 3) * (bins - 1)
    low = np.clip(np.floor(pixels), 0, bins - 2).astype(np.int64)
    frac = pixels - low
    histogram = np.zeros(bins ** 3)
    for dr in (0, 1):
        for dg in (0, 1):
            for db in (0, 1):
                index = ((low[:, 0] + dr) * bins + (low[:, 1] + dg)) * bins + (low[:, 2] + db)
                weight = ((frac[:, 0] if dr else 1 - frac[:, 0]) * (frac[:, 1] if dg else 1 - frac[:, 1])
                          * (frac[:, 2] if db else 1 - frac[:, 2]))
                histogram += np.bincount(index, weights=weight, minlength=bins ** 3)
    return histogram / histogram.sum()


def gradient_energy(image: np.ndarray) -> float:
    """Mean absolute luminance gradient: how busy (patterned, textured) an image is."""
    luma = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return float(np.abs(np.diff(luma, axis=0)).mean() + np.abs(np.diff(luma, axis=1)).mean())


def _style_scores(output: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    palette = float(np.minimum(soft_histogram(output), soft_histogram(target)).sum())
    # Compare at half resolution so pixel noise does not read as texture.
    e_out, e_target = gradient_energy(_down2(output)), gradient_energy(_down2(target))
    texture = (min(e_out, e_target) + 1e-3) / (max(e_out, e_target) + 1e-3)
    return palette, texture


def _boxes(meta: dict, key: str) -> list[list[float]]:
    return [element["box"] for element in meta[key]]


def gold_details(task: str, output: ImageLike, target: ImageLike, meta: dict) -> dict[str, float]:
    """The task's components and their weighted sum under "gold"; all in [0, 1]."""
    if task not in WEIGHTS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(WEIGHTS)}")
    target_array = to_array(target)
    output_array = _resized_to(output, *target_array.shape[:2])
    cmp = _Comparison(output_array, target_array)
    if task == "extending":
        crop = cmp.box_mask(meta["crop_box"])
        parts = {"outpainted": cmp.fidelity(1.0 - crop), "crop": cmp.fidelity(crop)}
    elif task == "filling":
        hole = cmp.box_mask(meta["mask_box"])
        parts = {"masked": cmp.fidelity(hole), "preserved": cmp.fidelity(1.0 - hole)}
    elif task == "rescaling":
        elements = [cmp.fidelity(cmp.box_mask(box)) for box in _boxes(meta, "element_boxes")]
        parts = {"elements": float(np.mean(elements)), "global": cmp.fidelity()}
    elif task == "identity-driven":
        parts = {"entity": cmp.fidelity(cmp.box_mask(meta["entity_box"])), "global": cmp.fidelity()}
    elif task == "layout-driven":
        boxes = [cmp.fidelity(cmp.box_mask(box)) for box in _boxes(meta, "layout_boxes")]
        parts = {"boxes": float(np.mean(boxes)), "global": cmp.fidelity()}
    else:  # style-driven
        palette, texture = _style_scores(output_array, target_array)
        parts = {"palette": palette, "texture": texture,
                 "content": cmp.fidelity(cmp.box_mask(meta["entity_box"])), "global": cmp.fidelity()}
    parts["gold"] = float(np.clip(sum(WEIGHTS[task][name] * value for name, value in parts.items()), 0.0, 1.0))
    return parts


def gold_metric(task: str, output: ImageLike, target: ImageLike, meta: dict) -> float:
    return gold_details(task, output, target, meta)["gold"]


# The tasks whose input shows part of the answer, and the meta box that says where (inside it, or outside it).
KNOWN_REGION = {"extending": ("crop_box", True), "filling": ("mask_box", False)}


def known_region_psnr(task: str, output: ImageLike, first_input: ImageLike, meta: dict) -> float | None:
    """PSNR (dB, [0, 1] RGB, capped at 60) of the output against the input where the input already shows the
    answer: inside the visible crop (extending), outside the hole (filling); None for the other tasks. The input
    is compared at the output's size."""
    if task not in KNOWN_REGION:
        return None
    key, inside = KNOWN_REGION[task]
    reference = to_array(first_input)
    cmp = _Comparison(_resized_to(output, *reference.shape[:2]), reference)
    box = cmp.box_mask(meta[key])
    mask = box if inside else 1.0 - box
    mse = float((cmp.errors[0] * mask).sum() / max(float(mask.sum()), 1e-6))
    return float(min(60.0, 10 * np.log10(1.0 / max(mse, 1e-6))))
