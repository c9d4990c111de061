"""Rule rewards on real task samples: preservation of the known region, and the title read by RapidOCR."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from posterrl.data.posters import canvas_size, sample_spec
from posterrl.data.render import render
from posterrl.data.tasks import TASKS, build_samples
from posterrl.models.samples import EditSample
from reward_server.rules import (
    NEUTRAL,
    OcrTitleScorer,
    PreservationScorer,
    best_title_match,
    edit_distance,
    text_accuracy,
)


def edit(sample, output):
    return EditSample(sample.id, sample.task, sample.instruction, sample.inputs, output, sample.meta)


def shifted(image: Image.Image) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, (1, 0, image.width // 5, 0, 1, 0), fillcolor=(128, 128, 128))


@pytest.mark.parametrize("task", ["extending", "filling"])
def test_preservation_ranks_copies_above_damage(task):
    scorer = PreservationScorer()
    for index in range(3):
        sample = build_samples(index, 0, 64, (task,))[0]
        blank = Image.new("RGB", sample.target.size, (255, 255, 255))
        noisy = Image.fromarray(np.clip(np.asarray(sample.target, dtype=np.float32)
                                        + np.random.default_rng(index).normal(0, 12, (*sample.target.size[::-1], 3)),
                                        0, 255).astype(np.uint8))
        batch = scorer.score([edit(sample, o) for o in (sample.target, noisy, shifted(sample.target), blank)])
        exact, light, moved, empty = batch.scores
        assert exact == pytest.approx(1.0, abs=1e-6)  # the target keeps the known region exactly
        assert exact > light > moved and light > empty
        assert light > 0.7 and empty < 0.3
        assert batch.details[0]["applies"] is True


def test_preservation_is_neutral_where_nothing_is_known():
    scorer = PreservationScorer()
    samples = build_samples(0, 0, 64, TASKS)
    blank = Image.new("RGB", (64, 64))
    batch = scorer.score([edit(s, blank) for s in samples if s.task not in ("extending", "filling")])
    assert batch.scores.tolist() == [NEUTRAL] * 4
    assert all(d == {"applies": False} for d in batch.details)


def test_edit_distance_and_text_accuracy_by_hand():
    assert edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    # whitespace and case do not count: "jazzmarket" vs "jazzmarkit" differ in one of 10 letters
    assert text_accuracy("Jazz Market", "JAZZ MARKIT") == pytest.approx(0.9)
    assert text_accuracy("OCEAN RUN", "") == 0.0
    # a title split over two OCR lines is matched by joining consecutive lines
    assert best_title_match("VELVET CRAFT NIGHTS", ["VELVET", "CRAFT NIGHTS", "WED 10 MAR"]) == (
        1.0, "VELVET CRAFT NIGHTS")


@pytest.fixture(scope="module")
def ocr():
    return OcrTitleScorer()


def test_ocr_ranks_the_right_title_above_a_wrong_one(ocr):
    for index in range(3):
        spec = sample_spec(np.random.default_rng([0, index, 0]))
        width, height = canvas_size(spec.aspect, 128)
        right = render(spec, width, height)
        wrong = render(replace(spec, title="PLASTIC HORIZON"), width, height)
        meta = {"poster": spec.summary()}
        batch = ocr.score([EditSample("p", "rescaling", "", [right], image, meta) for image in (right, wrong)])
        assert batch.scores[0] > 0.8 and batch.scores[0] > batch.scores[1] + 0.3
        assert batch.details[0]["title"] == spec.title


def test_ocr_without_a_title_is_nan_with_a_reason(ocr):
    image = Image.new("RGB", (32, 32))
    batch = ocr.score([EditSample("p", "filling", "", [image], image, {})])
    assert np.isnan(batch.scores[0]) and "no poster title" in batch.details[0]["reason"]
