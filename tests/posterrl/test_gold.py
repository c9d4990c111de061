"""Gold metric: the target scores ~1, a lightly corrupted target in between, trivial outputs low.

The means printed here (run with -s) are the table in docs/gold_metrics.md.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from posterrl.data.gold import gold_details, gold_metric
from posterrl.data.posters import NEUTRAL_GRAY
from posterrl.data.tasks import TASKS, build_samples

SIZE = 64
POSTERS = 24
BASELINES = ("input", "blank", "noise")
# Margins the metric holds over 24 posters per task, with room to spare (see docs/gold_metrics.md).
TARGET_MIN = 0.95
BASELINE_BELOW_TARGET = 0.3
CORRUPTED_ABOVE_BASELINES = 0.1
CORRUPTED_BELOW_TARGET = 0.05


def _png_round_trip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _corrupt(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian pixel noise (sigma 0.05) then a 1-pixel box blur."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    noisy = np.clip(pixels + rng.normal(0.0, 0.05, pixels.shape), 0.0, 1.0)
    return Image.fromarray((noisy * 255).round().astype(np.uint8)).filter(ImageFilter.BoxBlur(1))


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(0)
    table: dict[str, dict[str, list[float]]] = {task: {} for task in TASKS}
    for index in range(POSTERS):
        for sample in build_samples(index, seed=0, size=SIZE):
            target = sample.target
            outputs = {
                "target": target,
                "target_png": _png_round_trip(target),
                "corrupted": _corrupt(target, rng),
                "blurred": target.filter(ImageFilter.GaussianBlur(2)),
                "input": sample.inputs[0].resize(target.size, Image.BILINEAR),
                "blank": Image.new("RGB", target.size, NEUTRAL_GRAY),
                "noise": rng.uniform(0.0, 1.0, (target.height, target.width, 3)),
            }
            for name, output in outputs.items():
                table[sample.task].setdefault(name, []).append(gold_metric(sample.task, output, target, sample.meta))
    print(f"\n{'task':16s}" + "".join(f"{name:>11s}" for name in table[TASKS[0]]))
    for task in TASKS:
        print(f"{task:16s}" + "".join(f"{np.mean(values):11.3f}" for values in table[task].values()))
    return table


@pytest.mark.parametrize("task", TASKS)
def test_gold_ranks_target_corrupted_and_trivial_outputs(task, scores):
    table = scores[task]
    assert min(table["target"]) >= TARGET_MIN
    assert min(table["target_png"]) >= TARGET_MIN
    target = float(np.mean(table["target"]))
    corrupted = float(np.mean(table["corrupted"]))
    baselines = {name: float(np.mean(table[name])) for name in BASELINES}
    for name, value in baselines.items():
        assert value <= target - BASELINE_BELOW_TARGET, f"{name} scores {value:.3f}"
    assert corrupted >= max(baselines.values()) + CORRUPTED_ABOVE_BASELINES
    assert corrupted <= target - CORRUPTED_BELOW_TARGET


@pytest.mark.parametrize("task", TASKS)
def test_gold_gives_partial_credit_to_a_blurry_output(task, scores):
    blurred = float(np.mean(scores[task]["blurred"]))
    assert blurred >= max(np.mean(scores[task]["blank"]), np.mean(scores[task]["noise"])) + 0.3
    assert blurred < np.mean(scores[task]["corrupted"])


@pytest.fixture(scope="module")
def one_of_each():
    return build_samples(3, seed=0, size=SIZE)


def test_gold_resizes_output_to_the_target(one_of_each):
    for sample in one_of_each:
        target = sample.target
        # Pixel-doubled: the bilinear (antialiased) resize back costs a little sharpness, no more.
        larger = target.resize((target.width * 2, target.height * 2), Image.NEAREST)
        assert gold_metric(sample.task, larger, target, sample.meta) >= 0.85
        # A float array in [0, 1] scores like the same PIL image.
        as_array = np.asarray(target, dtype=np.float32) / 255.0
        assert gold_metric(sample.task, as_array, target, sample.meta) == pytest.approx(1.0)


def test_gold_details_are_components_in_unit_interval(one_of_each):
    rng = np.random.default_rng(1)
    for sample in one_of_each:
        details = gold_details(sample.task, _corrupt(sample.target, rng), sample.target, sample.meta)
        assert "gold" in details and len(details) >= 3
        assert all(0.0 <= value <= 1.0 for value in details.values())


def test_style_driven_rewards_the_style_statistics(one_of_each):
    sample = next(s for s in one_of_each if s.task == "style-driven")
    details = gold_details(sample.task, sample.inputs[0], sample.target, sample.meta)
    blank = gold_details(sample.task, Image.new("RGB", sample.target.size, NEUTRAL_GRAY), sample.target, sample.meta)
    assert details["palette"] > blank["palette"] + 0.3


def test_gold_rejects_unknown_tasks(one_of_each):
    with pytest.raises(ValueError, match="unknown task"):
        gold_metric("filing", one_of_each[0].target, one_of_each[0].target, one_of_each[0].meta)


def test_known_region_psnr_reads_only_the_region_the_input_shows():
    from posterrl.data.gold import known_region_psnr

    first = np.full((8, 8, 3), 0.5, np.float32)
    meta = {"crop_box": [0.0, 0.0, 0.5, 0.5], "mask_box": [0.0, 0.0, 0.5, 0.5]}
    output = first + 0.1  # a uniform error of 0.1: MSE 0.01, so 20 dB
    output[:4, :4] = 0.0  # garbage inside the top-left quarter
    assert known_region_psnr("filling", output, first, meta) == pytest.approx(20.0, abs=1e-3)  # outside the hole
    output = first.copy()
    output[4:, :] = 1.0  # garbage outside the crop; the crop itself exact
    assert known_region_psnr("extending", output, first, meta) == 60.0  # capped
    assert known_region_psnr("rescaling", output, first, meta) is None
