import math

import numpy as np
from PIL import Image

from posterrl.data.gold import gold_metric
from posterrl.data.tasks import TASKS, build_samples
from posterrl.models.samples import EditSample
from reward_server.oracle import GoldOracleScorer
from reward_server.registry import ScorerSpec, load_scorer


def test_gold_oracle_is_the_gold_metric_and_nan_without_a_target():
    scorer = load_scorer(ScorerSpec(name="oracle", kind="gold_oracle"))
    assert isinstance(scorer, GoldOracleScorer)
    samples = build_samples(0, 0, 64, TASKS)
    edits = []
    for s in samples:  # each task: the target itself, then the unedited first input
        edits.append(EditSample(s.id, s.task, s.instruction, s.inputs, s.target, s.meta, s.target))
        edits.append(EditSample(s.id, s.task, s.instruction, s.inputs, s.inputs[0], s.meta, s.target))
    scores = scorer.score(edits).scores
    assert np.allclose(scores[0::2], 1.0)
    expected = [gold_metric(s.task, s.inputs[0], s.target, s.meta) for s in samples]
    assert np.allclose(scores[1::2], expected)
    assert (scores[1::2] < 0.9).all()
    blank = Image.new("RGB", (64, 64))
    missing = scorer.score([EditSample("row-7", "filling", "fill", [blank], blank)])
    assert math.isnan(missing.scores[0]) and "row-7" in missing.details[0]["reason"]
