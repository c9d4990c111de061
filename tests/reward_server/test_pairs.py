"""Preference pairs from prompt groups, and pairwise accuracy against the gold metric."""

import numpy as np
import pytest
from PIL import Image

from posterrl.data.gold import gold_metric
from posterrl.data.manifest import load_manifest
from posterrl.data.tasks import generate_dataset
from posterrl.models.samples import PreferencePair
from reward_server.pairs import pairs_from_groups, pairwise_accuracy


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    manifest = generate_dataset(tmp_path_factory.mktemp("pairs"), n=1, seed=0, size=32,
                                tasks=("filling", "rescaling"))
    return load_manifest(manifest, require_target=True).rows


def outputs_for(row):
    """Three outputs of known quality: the target, a gray image, and the target blended with gray."""
    target = row.load_target()
    gray = Image.new("RGB", target.size, (128, 128, 128))
    return [gray, target, Image.blend(target, gray, 0.5)]


def test_pairs_follow_the_gold_ranking_without_noise(rows):
    pairs = pairs_from_groups([(r, outputs_for(r)) for r in rows], noise=0.0, tie_threshold=0.0,
                              negative_pairs=True, seed=0)
    assert len(pairs) == len(rows) * (3 + 1)  # K(K-1)/2 = 3 policy pairs and one negative pair per prompt
    policy = [p for p in pairs if p.source == "policy"]
    assert all(p.gold_margin > 0 for p in policy) and not any(p.tie for p in pairs)
    for row in rows:
        negative = next(p for p in pairs if p.source == "negative" and p.pair_id.startswith(row.id))
        assert np.array_equal(np.asarray(negative.chosen), np.asarray(row.load_target()))  # the best output
        assert negative.rejected.size == negative.chosen.size
        expected = gold_metric(row.task, negative.chosen, row.load_target(), row.meta) - gold_metric(
            row.task, negative.rejected, row.load_target(), row.meta)
        assert negative.gold_margin == pytest.approx(expected)


def test_noise_flips_some_pairs_and_ties_are_marked(rows):
    groups = [(r, outputs_for(r)) for r in rows]
    noisy = pairs_from_groups(groups, noise=5.0, tie_threshold=0.0, negative_pairs=False, seed=0)
    assert any(p.gold_margin < 0 for p in noisy)  # the annotator got some wrong
    tied = pairs_from_groups(groups, noise=0.0, tie_threshold=10.0, negative_pairs=False, seed=0)
    assert all(p.tie for p in tied)


def test_pairwise_accuracy_by_hand():
    image = Image.new("RGB", (4, 4))

    def pair(margin, source="policy", tie=False):
        return PreferencePair("p", "filling", "", [image], image, image, tie=tie, source=source, gold_margin=margin)

    pairs = [pair(0.2), pair(-0.1), pair(0.0), pair(0.3, "negative"), pair(0.5, tie=True), pair(None, "manifest")]
    chosen = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 2.0])
    rejected = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    acc = pairwise_accuracy(chosen, rejected, pairs)
    # counted: pair 0 right, pair 1 wrong (gold prefers the rejected), pair 3 wrong, pair 5 right (user label);
    # pair 2 (equal gold) and pair 4 (tie) are left out.
    assert acc["pairs"] == 4 and acc["pairwise_accuracy"] == 0.5
    assert acc["pairwise_accuracy_policy"] == 0.5 and acc["pairwise_accuracy_negative"] == 0.0
    assert acc["pairwise_accuracy_manifest"] == 1.0
    # clear pairs (|gold margin| >= 0.01): pairs 0, 1 and 3; the user's pair has no gold margin
    assert acc["pairwise_accuracy_clear"] == 1 / 3
