"""Rule rewards: preservation of the known region, and the poster title read back by a real OCR.

Neither needs a target: both check the output against what the policy was given (the input
frame, the instruction's title), so they can score any rollout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from posterrl.data.gold import TAU, to_array
from posterrl.models.samples import EditSample
from reward_server.types import ScoreBatch

# Tasks whose input holds pixels the output must keep: extending (the visible crop) and filling
# (everything outside the mask). The other tasks change the whole canvas by design.
PRESERVING_TASKS = ("extending", "filling")
NEUTRAL = 1.0  # what a task without a known region scores: it must not drop or bias the sample


def _known_mask(sample: EditSample, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the pixels of the output that must equal the input."""
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    key = "crop_box" if sample.task == "extending" else "mask_box"
    x0, y0, x1, y1 = sample.meta[key]
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]  # (H, W)
    return inside if sample.task == "extending" else ~inside


class PreservationScorer:
    """exp(-MSE / TAU) over the known region, in [0, 1] RGB at the output's size.

    TAU is the gold metric's (0.02): an exact copy scores 1.0, pixel noise of sigma 0.05 about
    0.88, a flat gray region < 0.2. Tasks without a known region score NEUTRAL with
    details {"applies": false}, so a live preservation scorer neither drops nor favours them.
    """

    kind = "preservation"
    score_range = (0.0, 1.0)

    def score(self, samples: Sequence[EditSample]) -> ScoreBatch:
        scores: list[float] = []
        details: list[dict] = []
        for sample in samples:
            if sample.task not in PRESERVING_TASKS:
                scores.append(NEUTRAL)
                details.append({"applies": False})
                continue
            output = to_array(sample.output)  # (H, W, 3)
            h, w = output.shape[:2]
            reference = to_array(sample.inputs[0].resize((w, h), Image.Resampling.BILINEAR))  # (H, W, 3)
            mask = _known_mask(sample, h, w)
            if not mask.any():
                scores.append(NEUTRAL)
                details.append({"applies": False, "reason": "the known region is empty at this size"})
                continue
            mse = float(((output - reference) ** 2)[mask].mean())
            scores.append(float(np.exp(-mse / TAU)))
            details.append({"applies": True, "mse": round(mse, 6), "known_pixels": int(mask.sum())})
        return ScoreBatch(np.asarray(scores, dtype=np.float64), details)


def normalize_text(text: str) -> str:
    """Case-folded with all whitespace removed: OCR splits and joins words unpredictably."""
    return "".join(text.casefold().split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_accuracy(expected: str, read: str) -> float:
    """1 - normalized edit distance, in [0, 1]."""
    a, b = normalize_text(expected), normalize_text(read)
    if not a and not b:
        return 1.0
    return 1.0 - edit_distance(a, b) / max(len(a), len(b))


def best_title_match(title: str, lines: Sequence[str]) -> tuple[float, str]:
    """The best accuracy over every run of consecutive OCR lines (a title often comes back as 2-3 lines)."""
    best = (0.0, "")
    for start in range(len(lines)):
        for stop in range(start + 1, min(len(lines), start + 4) + 1):
            candidate = " ".join(lines[start:stop])
            best = max(best, (text_accuracy(title, candidate), candidate))
    return best


class OcrTitleScorer:
    """Text accuracy of the poster title, read from the output by RapidOCR (PP-OCR det + rec, ONNX).

    Outputs are upscaled to a long side of `ocr_side` px first: the tiny default's 64 px posters
    are read reliably that way (docs/reward_rules.md). About 0.3-0.5 s per image on one CPU core.
    """

    kind = "ocr_title"
    score_range = (0.0, 1.0)

    def __init__(self, ocr_side: int = 512):
        import logging

        from rapidocr import RapidOCR

        self.engine = RapidOCR()
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)  # it logs every call at INFO
        self.ocr_side = ocr_side

    def read(self, image: Image.Image) -> list[str]:
        scale = self.ocr_side / max(image.size)
        upscaled = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                               Image.Resampling.BICUBIC)
        result = self.engine(upscaled)
        # det and rec both run (the defaults), so the answer has txts; the declared union also lists the
        # det-only and cls-only outputs, which do not
        return list(result.txts or ())  # type: ignore[union-attr]

    def score(self, samples: Sequence[EditSample]) -> ScoreBatch:
        scores: list[float] = []
        details: list[dict] = []
        for sample in samples:
            title = sample.meta.get("poster", {}).get("title")
            if not title:
                scores.append(float("nan"))
                details.append({"reason": "the sample's meta has no poster title to read"})
                continue
            lines = self.read(sample.output)
            accuracy, matched = best_title_match(title, lines)
            scores.append(accuracy)
            details.append({"title": title, "read": lines, "matched": matched})
        return ScoreBatch(np.asarray(scores, dtype=np.float64), details)
