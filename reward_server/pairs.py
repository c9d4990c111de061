"""Preference pairs from the policy's own samples, ranked by a noisy annotator, and their accuracy.

The annotator is the gold metric plus Gaussian noise (a stand-in for human raters who disagree on
close calls); held-out pairs are ranked by the noiseless gold metric, so accuracy is measured
against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
from PIL import Image

from posterrl.data.gold import gold_metric
from posterrl.data.manifest import ManifestRow
from posterrl.models.samples import PreferencePair


def pairs_from_groups(groups: Sequence[tuple[ManifestRow, list[Image.Image]]], noise: float, tie_threshold: float,
                      negative_pairs: bool, seed: int) -> list[PreferencePair]:
    """All K(K-1)/2 pairs of each prompt's K outputs, plus a negative pair per prompt.

    groups: (row, K output images at the target's size) per prompt.
    A pair is a tie when the annotator's two scores differ by less than tie_threshold. The negative
    pair (PosterOmni) has the group's best output (by the annotator) as chosen and the unedited
    first input as rejected.
    """
    rng = np.random.default_rng(seed)
    pairs: list[PreferencePair] = []
    for row, outputs in groups:
        target, inputs = row.require_target(), row.load_inputs()
        gold = np.array([gold_metric(row.task, image, target, row.meta) for image in outputs])  # (K,)
        noisy = gold + noise * rng.standard_normal(len(outputs))  # (K,) what the annotator saw
        for a, b in combinations(range(len(outputs)), 2):
            w, l = (a, b) if noisy[a] >= noisy[b] else (b, a)
            pairs.append(PreferencePair(
                f"{row.id}/{w}>{l}", row.task, row.instruction, inputs, outputs[w], outputs[l],
                tie=bool(abs(noisy[a] - noisy[b]) < tie_threshold), source="policy",
                gold_margin=float(gold[w] - gold[l])))
        if negative_pairs:
            best = int(np.argmax(noisy))
            unedited = inputs[0].resize(outputs[best].size, Image.Resampling.BICUBIC)
            pairs.append(PreferencePair(
                f"{row.id}/{best}>input", row.task, row.instruction, inputs, outputs[best], unedited,
                source="negative",
                gold_margin=float(gold[best] - gold_metric(row.task, unedited, target, row.meta))))
    return pairs


# Gold differences at least this large: pairs whose order a careful rater would see, reported on their own
# because most pairs of one prompt's samples differ by less (median 0.016 on the tiny default's student).
CLEAR_MARGIN = 0.01


def pairwise_accuracy(r_chosen: np.ndarray, r_rejected: np.ndarray,
                      pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Share of pairs the reward model orders like the gold metric (or like the user, for manifest pairs).

    Pairs the gold metric cannot order (equal gold) and ties are left out. Reported overall, per
    source (policy: two samples of one prompt; negative: a sample against the unedited input), and
    as `pairwise_accuracy_clear` over the pairs whose gold differs by at least CLEAR_MARGIN.
    """
    diff = np.asarray(r_chosen, dtype=np.float64) - np.asarray(r_rejected, dtype=np.float64)  # (P,)
    correct: dict[str, list[bool]] = {"all": []}
    for d, pair in zip(diff, pairs, strict=True):
        if pair.tie:
            continue
        truth = 1.0 if pair.gold_margin is None else np.sign(pair.gold_margin)
        if truth == 0:
            continue
        hit = bool(np.sign(d) == truth)
        correct["all"].append(hit)
        correct.setdefault(pair.source, []).append(hit)
        if pair.gold_margin is not None and abs(pair.gold_margin) >= CLEAR_MARGIN:
            correct.setdefault("clear", []).append(hit)
    out = {"pairwise_accuracy": float(np.mean(correct["all"])) if correct["all"] else float("nan"),
           "pairs": float(len(correct["all"]))}
    for source, hits in correct.items():
        if source != "all":
            out[f"pairwise_accuracy_{source}"] = float(np.mean(hits))
    return out
