from dataclasses import dataclass, field

import pytest

from learner.data import BatchPlan


@dataclass
class Row:
    id: str
    inputs: list = field(default_factory=list)


def rows():
    return [Row(f"a{i}", [0]) for i in range(10)] + [Row(f"b{i}", [0, 1]) for i in range(5)]


def test_batches_share_their_number_of_inputs_and_are_deterministic():
    plan, again = BatchPlan(rows(), 4, seed=0), BatchPlan(rows(), 4, seed=0)
    for step in range(12):
        batch = plan.batch(step)
        assert len(batch) == 4 and len({len(r.inputs) for r in batch}) == 1
        assert [r.id for r in batch] == [r.id for r in again.batch(step)]
    assert [r.id for r in BatchPlan(rows(), 4, seed=1).batch(0)] != [r.id for r in plan.batch(0)] or \
        [r.id for r in BatchPlan(rows(), 4, seed=1).batch(1)] != [r.id for r in plan.batch(1)]


def test_every_row_of_a_bucket_is_seen_once_per_epoch():
    plan = BatchPlan(rows(), 5, seed=3)
    seen = []
    for step in range(40):
        batch = plan.batch(step)
        if len(batch[0].inputs) == 1:
            seen.extend(r.id for r in batch)
    first_epoch = seen[:10]
    assert sorted(first_epoch) == sorted(f"a{i}" for i in range(10))


def test_empty_plan_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        BatchPlan([], 4, 0)
