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
from reward_server.registry import Journal, RegistryError, RewardRegistry, ScorerSpec
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


SCORERS = {"const": ConstantScorer, "nan_odd": NanOnOddScorer, "hang": HangingScorer}


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


def test_journal_restores_registry_and_versions(registry, tmp_path):
    initial = [ScorerSpec("a", "preservation", path="1"), ScorerSpec("b", "preservation", path="2")]
    assert registry.restore(initial) == []
    registry.swap("a", path="3")
    registry.swap("a", path="4")
    registry.remove("b")
    registry.add(ScorerSpec("c", "preservation", weight=0.0, path="5"))
    registry.set_weight("c", 2.0)
    before = registry.describe()

    again = RewardRegistry(samples(2), Journal(tmp_path / "journal.jsonl"), loader=loader)
    assert again.restore(initial) == []
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
    problems = registry.restore([ScorerSpec("a", "preservation", path="1")])
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
    assert len(registry.restore([ScorerSpec("a", "preservation", path="1")])) == 5  # no KeyError: it starts
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
