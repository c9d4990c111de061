"""The reward registry and the dynamic batcher, in-process, with small scorers defined here."""

import asyncio
import json
import logging
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from posterrl.models.samples import EditSample
from reward_server.batching import DynamicBatcher
from reward_server.registry import Journal, RegistryError, RewardRegistry, ScorerLoadError, ScorerSpec, record_problem
from reward_server.types import ScoreBatch


class ConstantScorer:
    """Scores every sample with the number in its path (so a swap to another path changes the score)."""

    kind = "preservation"
    score_range = (0.0, 10.0)

    def __init__(self, path):
        if path == "missing":
            raise FileNotFoundError("no such checkpoint: missing")
        self.value = float(path)

    def score(self, samples):
        return ScoreBatch(np.full(len(samples), self.value), [{} for _ in samples])


class NanOnOddScorer(ConstantScorer):
    def score(self, samples):
        scores = np.array([np.nan if i % 2 else self.value for i in range(len(samples))])
        return ScoreBatch(scores, [{} for _ in samples])


class HangingScorer(ConstantScorer):
    release = threading.Event()

    def score(self, samples):
        if len(samples) > 2:  # the probe batch has 2 samples and passes; real batches hang
            self.release.wait(10)
        return super().score(samples)


class ShortScorer(ConstantScorer):
    """Passes the probe (2 samples), then answers one score short."""

    def score(self, samples):
        k = len(samples) if len(samples) <= 2 else len(samples) - 1
        return ScoreBatch(np.full(k, self.value), [{} for _ in range(k)])


class TextScorer(ConstantScorer):
    """Passes the probe, then answers with words instead of numbers."""

    def score(self, samples):
        if len(samples) <= 2:
            return super().score(samples)
        return ScoreBatch(np.array(["good"] * len(samples), dtype=object), [{} for _ in samples])


class DriftScorer(ConstantScorer):
    """Unbounded; passes the probe, then sample i scores value * 10**i."""

    score_range = (-float("inf"), float("inf"))

    def score(self, samples):
        if len(samples) <= 2:
            return super().score(samples)
        return ScoreBatch(np.array([self.value * 10.0**i for i in range(len(samples))]), [{} for _ in samples])


class RangeScorer(ConstantScorer):
    """Range [0, 10]; passes the probe, then answers value, value + 20, -value."""

    def score(self, samples):
        if len(samples) <= 2:
            return super().score(samples)
        return ScoreBatch(np.array([self.value, self.value + 20, -self.value]), [{} for _ in samples])


SCORERS = {"const": ConstantScorer, "nan_odd": NanOnOddScorer, "hang": HangingScorer, "short": ShortScorer,
           "text": TextScorer, "drift": DriftScorer, "range": RangeScorer}


def loader(spec: ScorerSpec):
    return SCORERS[spec.backend or "const"](spec.path)


def samples(n, prefix="s"):
    image = Image.new("RGB", (8, 8))
    return [EditSample(f"{prefix}{i}", "filling", "fill", [image], image, {}) for i in range(n)]


@pytest.fixture
def registry(tmp_path):
    HangingScorer.release.clear()
    reg = RewardRegistry(samples(2), Journal(tmp_path / "journal.jsonl"), timeout_s=0.5, loader=loader)
    yield reg
    HangingScorer.release.set()
    reg.close()


def test_weighted_sum_versions_and_shadow(registry):
    registry.add(ScorerSpec("a", "preservation", weight=1.0, path="2"))
    registry.add(ScorerSpec("b", "preservation", weight=0.5, path="4"))
    registry.add(ScorerSpec("shadow", "preservation", weight=0.0, path="7"))
    result = registry.score(samples(3))[0]
    assert result.reward == pytest.approx(1.0 * 2 + 0.5 * 4)  # the shadow scorer does not count
    assert result.components == {"a": 2.0, "b": 4.0, "shadow": 7.0}  # but it is scored and reported
    assert result.versions == {"a": 1, "b": 1, "shadow": 1}
    registry.swap("a", path="3")
    registry.set_weight("shadow", 1.0)
    result = registry.score(samples(1))[0]
    assert result.versions == {"a": 2, "b": 1, "shadow": 1}  # re-weighting keeps the version
    assert result.reward == pytest.approx(3 + 2 + 7)


def test_nonfinite_scores_are_dropped_and_counted(registry):
    registry.add(ScorerSpec("a", "preservation", path="1"))
    registry.add(ScorerSpec("odd", "preservation", weight=0.0, backend="nan_odd", path="5"))
    results = registry.score(samples(4))
    # a shadow scorer's NaN does not drop the sample, but it is never passed on as a component
    assert [r.reward for r in results] == [1.0, 1.0, 1.0, 1.0]
    assert "odd" not in results[1].components and "non-finite" in results[1].failed["odd"]
    registry.set_weight("odd", 1.0)
    results = registry.score(samples(4))
    assert [r.reward for r in results] == [6.0, None, 6.0, None]  # a live scorer's NaN drops the sample
    assert registry.failures["odd"]["nonfinite"] == 4


def test_failed_load_or_probe_leaves_the_old_scorer(registry, tmp_path):
    registry.add(ScorerSpec("a", "preservation", path="1"))
    with pytest.raises(RegistryError, match="failed to load: FileNotFoundError: no such checkpoint: missing"):
        registry.swap("a", path="missing")
    with pytest.raises(RegistryError, match="outside its range"):
        registry.swap("a", path="11")
    with pytest.raises(RegistryError, match="no finite score"):
        registry.swap("a", path="nan")
    with pytest.raises(RegistryError, match="no scorer named 'b'"):
        registry.swap("b", path="2")
    result = registry.score(samples(1))[0]
    assert result.components == {"a": 1.0} and result.versions == {"a": 1}
    ops = [json.loads(line)["op"] for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert ops == ["add"]  # refused changes are not journaled


def test_hung_scorer_times_out_instead_of_freezing(registry):
    registry.add(ScorerSpec("a", "preservation", path="1"))
    registry.add(ScorerSpec("slow", "preservation", weight=0.0, backend="hang", path="2"))
    began = time.perf_counter()
    first = registry.score(samples(3))
    second = registry.score(samples(3))  # the hung scorer is still busy: skipped at once
    elapsed = time.perf_counter() - began
    assert elapsed < 5  # far below the 10 s the scorer hangs for: nobody waited for it
    assert all(r.reward == 1.0 for r in first + second)
    assert "timed out" in first[0].failed["slow"] and "busy" in second[0].failed["slow"]
    assert registry.failures["slow"]["timeout"] == 6


def test_swap_replaces_a_hung_scorer_at_the_next_batch(registry):
    registry.add(ScorerSpec("a", "preservation", path="1"))
    registry.add(ScorerSpec("slow", "preservation", backend="hang", path="2"))  # live: its failures drop rewards
    first = registry.score(samples(3))  # hangs: abandoned after timeout_s = 0.5
    second = registry.score(samples(3))  # its thread is still stuck: skipped at once
    assert [r.failed for r in first] == [{"slow": "timed out after 0.5 s"}] * 3
    assert [r.failed for r in second] == [{"slow": "still busy after an earlier timeout"}] * 3
    assert [r.reward for r in first + second] == [None] * 6
    assert [r.components for r in first + second] == [{"a": 1.0}] * 6
    stuck = registry.snapshot()["slow"].runner

    assert registry.swap("slow", path="3", backend="const").version == 2  # a healthy scorer, same name
    began = time.perf_counter()
    third = registry.score(samples(3))
    assert time.perf_counter() - began < 0.5  # no wait for the old, still-stuck thread
    assert [r.reward for r in third] == [4.0] * 3
    assert [r.components for r in third] == [{"a": 1.0, "slow": 3.0}] * 3
    assert [r.versions for r in third] == [{"a": 1, "slow": 2}] * 3
    assert [r.failed for r in third] == [{}] * 3
    assert registry.failures == {"slow": {"timeout": 6}}

    assert stuck.stuck()  # abandoned, not joined: still blocked in version 1's score
    HangingScorer.release.set()
    stuck.busy.result(timeout=5)
    deadline = time.time() + 5
    while any(t.name.startswith("scorer-slow-v1") for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name.startswith("scorer-slow-v1") for t in threading.enumerate())  # its thread ended


def test_wrong_length_or_non_numeric_answers_fail_only_that_scorer(registry):
    registry.add(ScorerSpec("a", "preservation", path="1"))
    registry.add(ScorerSpec("short", "preservation", weight=0.0, backend="short", path="2"))
    registry.add(ScorerSpec("text", "preservation", weight=0.0, backend="text", path="3"))
    results = registry.score(samples(3))
    assert [r.reward for r in results] == [1.0] * 3  # shadow scorers: the samples keep their reward
    assert [r.components for r in results] == [{"a": 1.0}] * 3
    assert [r.failed for r in results] == [{
        "short": "expected 3 scores, got shape (2,)",
        "text": "expected 3 numeric scores, got ValueError: could not convert string to float: 'good'",
    }] * 3
    assert registry.failures == {"short": {"wrong_length": 3}, "text": {"wrong_length": 3}}

    registry.set_weight("short", 1.0)  # live now: its lost scores drop the samples
    results = registry.score(samples(4))
    assert [r.reward for r in results] == [None] * 4
    assert [r.failed["short"] for r in results] == ["expected 4 scores, got shape (3,)"] * 4
    assert registry.failures["short"] == {"wrong_length": 7}

    async def two_requests():  # through the batcher: both requests of the batch are answered
        batcher = DynamicBatcher(registry.score, max_batch_size=8, max_wait_s=0.05)
        return await asyncio.gather(batcher.submit(samples(2, "x")), batcher.submit(samples(2, "y")))

    first, second = asyncio.run(two_requests())
    assert [r.prompt_id for r in first + second] == ["x0", "x1", "y0", "y1"]
    assert all(r.components["a"] == 1.0 and "short" in r.failed for r in first + second)


def test_out_of_range_scores_are_dropped_and_counted(tmp_path):
    with pytest.raises(ValueError, match="max_abs_score must be > 0, got 0"):
        RewardRegistry(samples(2), loader=loader, max_abs_score=0)
    registry = RewardRegistry(samples(2), loader=loader, max_abs_score=50)
    try:
        registry.add(ScorerSpec("drift", "bradley_terry", backend="drift", path="1"))  # unbounded range
        registry.add(ScorerSpec("range", "preservation", weight=0.5, backend="range", path="5"))  # range [0, 10]
        results = registry.score(samples(3))
        # drift scores 1, 10, 100 (100 > 50); range scores 5, 25, -5 (25 and -5 outside [0, 10])
        assert [r.reward for r in results] == [1 + 0.5 * 5, None, None]
        assert [r.components for r in results] == [{"drift": 1.0, "range": 5.0}, {"drift": 10.0}, {}]
        assert [r.failed for r in results] == [
            {},
            {"range": "score 25 out of range: outside the scorer's score_range [0, 10]"},
            {"drift": "score 100 out of range: |score| above max_abs_score 50",
             "range": "score -5 out of range: outside the scorer's score_range [0, 10]"},
        ]
        assert registry.failures == {"drift": {"out_of_range": 1}, "range": {"out_of_range": 2}}
        with pytest.raises(RegistryError, match=r"probe scores \[60.0, 60.0\] beyond max_abs_score 50"):
            registry.swap("drift", path="60")  # refused before it goes live
        assert registry.versions() == {"drift": 1, "range": 1}
    finally:
        registry.close()


def test_restore_reports_which_failed_scorers_are_required(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    old_spec = {"name": "old", "kind": "preservation", "weight": 1.0, "path": "missing", "backend": None,
                "url": None}  # journaled before `optional` existed: no such key
    journal.append("add", spec=old_spec, version=1)
    journal.append("add", spec={**old_spec, "name": "extra", "optional": True}, version=1)
    journal.append("swap", spec={**old_spec, "name": "judge"}, version=2)  # the config says optional: it wins
    registry = RewardRegistry(samples(2), journal, loader=loader)
    report = registry.restore([ScorerSpec("a", "preservation", path="1"),
                               ScorerSpec("bt", "bradley_terry", path="missing"),
                               ScorerSpec("judge", "preservation", path="3", optional=True)])
    assert [(f.spec.name, f.spec.optional) for f in report.failed] == [
        ("bt", False), ("judge", True), ("old", False), ("extra", True)]
    assert [f.spec.name for f in report.required] == ["bt", "old"]
    assert report.problems == [f.reason for f in report.failed]
    assert registry.versions() == {"a": 1}  # the registry serves what did load
    with pytest.raises(ScorerLoadError) as err:
        report.raise_for_required()
    assert str(err.value) == (
        "the reward server cannot start: "
        "scorer 'bt' (kind bradley_terry, path 'missing') is not optional and could not be restored: scorer 'bt' "
        "(bradley_terry, path='missing') failed to load: FileNotFoundError: no such checkpoint: missing; "
        "scorer 'old' (kind preservation, path 'missing') is not optional and could not be restored: scorer 'old' "
        "(preservation, path='missing') failed to load: FileNotFoundError: no such checkpoint: missing. "
        "Make the path load again, or mark the scorer optional (reward.scorers[].optional: true, or "
        "`posterrl reward add --optional`) to serve without it")
    assert isinstance(err.value, RegistryError)

    registry.add(ScorerSpec("new", "preservation", path="4", optional=True))
    assert journal.records()[-1]["spec"]["optional"] is True  # journaled with the spec
    assert record_problem({"op": "add", "spec": {"name": "x", "kind": "preservation", "optional": "yes"},
                           "version": 1}).endswith("spec's optional is 'yes', expected true or false")
    only_optional = RewardRegistry(samples(2), loader=loader).restore(
        [ScorerSpec("a", "preservation", path="1"), ScorerSpec("gone", "preservation", path="missing", optional=True)])
    only_optional.raise_for_required()  # nothing required is missing: no error
    assert [f.spec.name for f in only_optional.failed] == ["gone"] and only_optional.required == []


def test_journal_restores_registry_and_versions(registry, tmp_path):
    initial = [ScorerSpec("a", "preservation", path="1"), ScorerSpec("b", "preservation", path="2")]
    assert registry.restore(initial).problems == []
    registry.swap("a", path="3")
    registry.swap("a", path="4")
    registry.remove("b")
    registry.add(ScorerSpec("c", "preservation", weight=0.0, path="5"))
    registry.set_weight("c", 2.0)
    before = registry.describe()

    again = RewardRegistry(samples(2), Journal(tmp_path / "journal.jsonl"), loader=loader)
    report = again.restore(initial)
    assert report.problems == [] and report.failed == []
    assert again.describe() == [{**d, "loaded_at": e["loaded_at"]} for d, e in zip(before, again.describe())]
    assert again.versions() == {"a": 3, "c": 1}
    assert again.score(samples(1))[0].reward == pytest.approx(4 + 2 * 5)
    again.add(ScorerSpec("b", "preservation", path="6"))
    assert again.versions()["b"] == 2  # a name that comes back keeps counting


def test_unloadable_journaled_scorer_is_reported_not_fatal(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append("add", spec={"name": "gone", "kind": "preservation", "weight": 1.0, "path": "missing",
                                "backend": None, "url": None}, version=1)
    with journal.path.open("a") as handle:
        handle.write('{"op": "swap", "spec": {"na')  # a torn line from a crash
    registry = RewardRegistry(samples(2), journal, loader=loader)
    problems = registry.restore([ScorerSpec("a", "preservation", path="1")]).problems
    assert any("gone" in p and "failed to load" in p for p in problems)
    assert any(f"{journal.path}:2: not JSON" in p for p in problems)
    assert registry.versions() == {"a": 1}


def test_journal_skips_torn_and_misshapen_lines_and_keeps_the_rest(tmp_path, caplog):
    path = tmp_path / "journal.jsonl"
    spec = {"name": "b", "kind": "preservation", "weight": 1.0, "path": "2", "backend": None, "url": None}
    path.write_text("\n".join([
        json.dumps({"time": "t", "op": "add", "spec": spec, "version": 2}),
        '{"op": "swap", "spec": {"na',  # torn in the middle of the file
        json.dumps({"time": "t", "op": "set_weight", "name": "b"}),  # no weight
        json.dumps({"time": "t", "op": "rename", "name": "b"}),  # unknown op
        json.dumps({"time": "t", "op": "swap", "version": 3}),  # no spec
        "[1, 2]",
        json.dumps({"time": "t", "op": "set_weight", "name": "b", "weight": 3.0}),
    ]) + "\n")
    journal = Journal(path)
    with caplog.at_level(logging.WARNING):
        records, problems = journal.read()
    assert [r["op"] for r in records] == ["add", "set_weight"]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "not JSON" in problems[0] and "weight" in problems[1] and "unknown op 'rename'" in problems[2]
    assert "spec" in problems[3] and "expected an object" in problems[4]
    assert f"{path}:4" in caplog.text
    registry = RewardRegistry(samples(2), journal, loader=loader)
    assert len(registry.restore([ScorerSpec("a", "preservation", path="1")]).problems) == 5  # no KeyError
    assert registry.versions() == {"a": 1, "b": 2}
    assert registry.score(samples(1))[0].reward == pytest.approx(1 + 3 * 2)


def test_journal_append_after_a_torn_line_keeps_the_new_record(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append("remove", name="x", version=1)
    with journal.path.open("a") as handle:
        handle.write('{"op": "swap", "spec": {"na')  # a crash mid-append, no newline
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    journal.append("set_weight", name="y", weight=2.0, version=1)
    assert synced  # the append is on disk before the change is acknowledged
    records, problems = journal.read()
    assert [(r["op"], r["name"]) for r in records] == [("remove", "x"), ("set_weight", "y")]
    assert len(problems) == 1 and f"{journal.path}:2" in problems[0]


def test_journal_record_glued_to_a_torn_line_is_recovered(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"op": "swap", "spec": {"na' + json.dumps({"time": "t", "op": "remove", "name": "a"}) + "\n")
    records, problems = Journal(path).read()
    assert records == [{"time": "t", "op": "remove", "name": "a"}]
    assert f"{path}:1" in problems[0] and "kept" in problems[0]


def test_no_live_scorer_gives_no_reward(registry):
    registry.add(ScorerSpec("shadow", "preservation", weight=0.0, path="1"))
    result = registry.score(samples(1))[0]
    assert result.reward is None and result.components == {"shadow": 1.0}


def test_dynamic_batcher_groups_concurrent_requests():
    seen_batches = []

    def score_batch(items):
        seen_batches.append(len(items))
        time.sleep(0.01)
        return [item * 10 for item in items]

    async def main():
        batcher = DynamicBatcher(score_batch, max_batch_size=8, max_wait_s=0.05)
        answers = await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(12)))
        return batcher, answers

    batcher, answers = asyncio.run(main())
    assert answers == [[i * 10, (i + 100) * 10] for i in range(12)]  # every request gets its own slice
    assert sum(seen_batches) == 24 and max(seen_batches) <= 8
    assert len(seen_batches) <= 4  # 12 concurrent requests of 2 samples fill batches of 8
    assert batcher.stats.requests == 12 and batcher.stats.batches == len(seen_batches)


def test_dynamic_batcher_reports_errors_and_keeps_serving():
    def score_batch(items):
        if "bad" in items:
            raise RuntimeError("scorer exploded")
        return items

    async def main():
        batcher = DynamicBatcher(score_batch, max_batch_size=1, max_wait_s=0.0)
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(["bad"])
        return await batcher.submit(["good"])

    assert asyncio.run(main()) == ["good"]


@pytest.mark.parametrize("spec, message", [
    (ScorerSpec("a/b", "preservation", path="1"), "name 'a/b': expected a non-empty name"),
    (ScorerSpec("", "preservation", path="1"), "name '': expected a non-empty name"),
    (ScorerSpec("x", "magic", path="1"), "kind 'magic': expected one of"),
    (ScorerSpec("x", "preservation", weight=float("nan"), path="1"), "weight nan: expected a finite number"),
    (ScorerSpec("x", "vlm_judge", path="1", url="file:///etc/passwd"), "url 'file:///etc/passwd': expected an http"),
])
def test_add_refuses_specs_no_config_could_hold(registry, spec, message):
    with pytest.raises(RegistryError, match=message):
        registry.add(spec)
    assert registry.versions() == {} and registry.journal.records() == []


def test_swap_refuses_a_non_http_url(registry):
    registry.add(ScorerSpec("a", "preservation", path="1"))
    with pytest.raises(RegistryError, match="url 'file:///x': expected an http"):
        registry.swap("a", url="file:///x")
    with pytest.raises(RegistryError, match="weight inf: expected a finite number"):
        registry.set_weight("a", float("inf"))
    assert registry.versions() == {"a": 1}


@pytest.mark.parametrize("spec, message", [
    (ScorerSpec("p", "preservation", url="http://x"), "url does not apply to kind preservation"),
    (ScorerSpec("o", "ocr_title", path="m"), "path does not apply to kind ocr_title"),
    (ScorerSpec("b", "bradley_terry", path="m", backend="vllm"), "backend does not apply to kind bradley_terry"),
    (ScorerSpec("j", "vlm_judge", path="m"), "kind vlm_judge needs backend"),
])
def test_load_scorer_refuses_options_its_kind_does_not_take(spec, message):
    from reward_server.registry import load_scorer

    with pytest.raises(RegistryError, match=message):
        load_scorer(spec)
