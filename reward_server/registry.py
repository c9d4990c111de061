"""The reward registry: named scorers with weights and versions, changed while a job runs.

No Ray here: actors/reward_server.py puts a registry behind a named actor; tests use it in-process.

A change (add, swap, remove, set-weight) loads the new scorer and probes it on a small batch
before it goes live, outside the lock so scoring goes on meanwhile; only a scorer that loaded and
gave finite, in-range scores replaces anything. Every committed change is appended to a journal
(JSONL in the run directory) that a restarted server replays to come back with the same registry.

Scoring never trusts a scorer: one that hangs, raises, answers with the wrong number of scores or with
scores that are not finite or out of range loses only its own scores of that batch, counted per kind in
`failures` (FAILURE_KINDS); the other scorers' scores stand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from posterrl.config.schema import RewardConfig
from posterrl.config.validate import scorer_option_problems, scorer_value_problems, weight_problem
from posterrl.errors import UserError
from posterrl.files import fsync_dir
from posterrl.models.samples import EditSample
from posterrl.names import SCORER_KINDS
from reward_server.types import ScoreBatch, Scorer

JOURNAL_FILE = "reward_journal.jsonl"
log = logging.getLogger(__name__)
KINDS = SCORER_KINDS  # the config's reward.scorers[].kind choices
# How a scorer's score of a sample can be dropped: the keys of RewardRegistry.failures[name].
FAILURE_KINDS = ("timeout", "error", "nonfinite", "wrong_length", "out_of_range")
DEFAULT_MAX_ABS_SCORE: float = RewardConfig.model_fields["max_abs_score"].default  # as the config's default


class RegistryError(UserError):
    """A change that cannot be made; the message says why and the registry is unchanged."""


class ScorerLoadError(RegistryError):
    """A scorer that is not `optional` could not be loaded when the reward server (re)started."""


@dataclass(frozen=True)
class ScorerSpec:
    """What it takes to load a scorer again: the config entry, as the journal stores it."""

    name: str
    kind: str
    weight: float = 1.0
    path: str | None = None
    backend: str | None = None
    url: str | None = None
    api_key_env: str | None = None  # vlm_judge openai: the environment variable with the API key (not the key)
    optional: bool = False  # a (re)starting server may serve without it when it fails to load


def spec_problems(spec: ScorerSpec) -> list[str]:
    """What is wrong with a spec whatever loads it (name, kind, finite weight, http(s) url): the same check as
    the config's reward.scorers and `posterrl reward add` (posterrl/config/validate.py)."""
    return scorer_value_problems(spec.name, spec.kind, spec.weight, spec.url)


def load_scorer(spec: ScorerSpec) -> Scorer:
    """The one place that maps a scorer kind to its class (imported lazily: a judge may need vllm)."""
    problems = scorer_option_problems(spec.kind, spec.path, spec.backend, spec.url)
    if problems:
        raise RegistryError(f"scorer {spec.name!r}: {'; '.join(problems)}")
    if spec.kind == "bradley_terry":
        from reward_server.bradley_terry import BradleyTerryScorer

        if spec.path is None:
            raise RegistryError(f"scorer {spec.name!r}: kind bradley_terry needs path (a saved reward model)")
        return BradleyTerryScorer(spec.path)
    if spec.kind == "vlm_judge":
        from reward_server.judge import VlmJudge

        if spec.backend is None or spec.path is None:
            raise RegistryError(f"scorer {spec.name!r}: kind vlm_judge needs backend (transformers, vllm or openai) "
                                "and path (a model directory, or the served model's name for openai)")
        return VlmJudge(backend=spec.backend, path=spec.path, url=spec.url, api_key_env=spec.api_key_env)
    if spec.kind == "preservation":
        from reward_server.rules import PreservationScorer

        return PreservationScorer()
    if spec.kind == "ocr_title":
        from reward_server.rules import OcrTitleScorer

        return OcrTitleScorer()
    if spec.kind == "gold_oracle":
        from reward_server.oracle import GoldOracleScorer

        return GoldOracleScorer()
    raise RegistryError(f"scorer {spec.name!r}: unknown kind {spec.kind!r}; known kinds: {', '.join(KINDS)}")


def fingerprint(spec: ScorerSpec) -> str:
    """A short hash of what the scorer was loaded from (the files under path, or the spec itself)."""
    digest = hashlib.sha1(json.dumps([spec.kind, spec.path, spec.backend, spec.url]).encode())
    root = Path(spec.path) if spec.path else None
    if root is not None and root.exists():
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            stat = file.stat()
            digest.update(f"{file.relative_to(root.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:10]


class ScorerRunner:
    """The one thread a loaded scorer runs on, and its call in flight.

    A scorer is never called again while an earlier call still runs (a hung one is skipped, not queued
    behind). Each loaded scorer (each version) has a runner of its own, so a swap's new scorer runs at
    once even while the old one is stuck; the stuck thread is abandoned, never joined.
    """

    def __init__(self, name: str):
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.busy: Future | None = None

    def stuck(self) -> bool:
        busy = self.busy
        return busy is not None and not busy.done()

    def submit(self, fn: Callable, *args) -> Future:
        with self._lock:
            if self._executor is None:  # first call, or called again after close(): a fresh thread
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"scorer-{self.name}")
            self.busy = self._executor.submit(fn, *args)
            return self.busy

    def close(self) -> None:
        """The thread ends once its call (if any) returns; nothing waits for it."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None


@dataclass
class Entry:
    spec: ScorerSpec
    scorer: Scorer
    version: int
    fingerprint: str
    loaded_at: float = field(default_factory=time.time)
    # set_weight's replace() keeps it: same scorer, same thread; a swap makes a new Entry and a new runner
    runner: ScorerRunner = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = ScorerRunner(f"{self.spec.name}-v{self.version}")

    @property
    def weight(self) -> float:
        return self.spec.weight

    def describe(self) -> dict:
        return {**asdict(self.spec), "version": self.version, "fingerprint": self.fingerprint,
                "status": "live" if self.weight != 0 else "shadow", "loaded_at": self.loaded_at}


@dataclass
class RewardResult:
    """The reward of one sample and where it came from.

    reward:     sum of weight * score over the live scorers (weight != 0); None when a live
                scorer could not give a usable score, so the sample must not be trained on
    components: every scorer's finite score, shadow scorers (weight 0) included
    versions:   {scorer: version} of every scorer that was asked, the shadow ones included
    failed:     {scorer: reason} for each scorer whose score was dropped (timeout, error, non-finite,
                wrong length, out of range: FAILURE_KINDS)
    """

    prompt_id: str
    reward: float | None
    components: dict[str, float]
    weights: dict[str, float]
    versions: dict[str, int]
    failed: dict[str, str]
    details: dict[str, dict] = field(default_factory=dict)


class Journal:
    """Append-only JSONL of committed changes; one line per change, flushed and fsync'd at once.

    Reading skips what a crash or a hand edit can leave (a torn line, a line that is not JSON, a record
    of the wrong shape) with a problem naming the file and line, and keeps every whole record around it.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None

    def append(self, op: str, **fields) -> dict:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "op": op, **fields}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            with self.path.open("ab") as handle:
                # a torn last line (a crash mid-append) gets its own line, so this record stays whole
                torn = handle.tell() > 0 and _last_byte(self.path) != b"\n"
                handle.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
                handle.flush()
                os.fsync(handle.fileno())
            if new:
                fsync_dir(self.path.parent)
        return record

    def records(self) -> list[dict]:
        """The well-formed records; what was skipped is in `read()`'s problems."""
        return self.read()[0]

    def read(self) -> tuple[list[dict], list[str]]:
        """(well-formed records in order, problems: "FILE:LINE: what is wrong; skipped")."""
        if self.path is None or not self.path.is_file():
            return [], []
        records, problems = [], []
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                # a torn line that the next record was appended to (journals before the newline fix): keep that one
                tail = _trailing_record(line)
                problems.append(f"{where}: not JSON, a torn or edited line ({exc}); skipped"
                                + ("; the record appended after it on the same line is kept" if tail else ""))
                if tail is None:
                    continue
                record = tail
            problem = record_problem(record)
            if problem:
                problems.append(f"{where}: {problem}; skipped")
                continue
            records.append(record)
        for problem in problems:
            log.warning("reward journal: %s", problem)
        return records, problems


_SPEC_FIELDS = {f.name for f in fields(ScorerSpec)}
_OPS = {  # op -> the keys its record needs and what they hold
    "add": "spec (a scorer spec object) and version (an int)",
    "swap": "spec (a scorer spec object) and version (an int)",
    "remove": "name (a string)",
    "set_weight": "name (a string) and weight (a number)",
}


def record_problem(record: object) -> str | None:
    """What is wrong with the shape of one journal record, or None when replay can use it."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, expected an object with \"op\" ({', '.join(_OPS)})"
    op = record.get("op")
    if op not in _OPS:
        return f"unknown op {op!r}, expected one of {', '.join(_OPS)}"
    expected = f"op {op} expects {_OPS[op]}"
    if op in ("add", "swap"):
        spec, version = record.get("spec"), record.get("version")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("kind"), str):
            return f"{expected}; spec is {spec!r}"
        unknown = sorted(set(spec) - _SPEC_FIELDS)
        if unknown:
            return f"{expected}; spec has unknown keys {unknown} (known: {sorted(_SPEC_FIELDS)})"
        if not isinstance(version, int) or isinstance(version, bool):
            return f"{expected}; version is {version!r}"
        if not isinstance(spec.get("optional", False), bool):  # journals from before `optional` lack the key
            return f"{expected}; spec's optional is {spec['optional']!r}, expected true or false"
        return None
    if not isinstance(record.get("name"), str):
        return f"{expected}; name is {record.get('name')!r}"
    weight = record.get("weight")
    if op == "set_weight" and (not isinstance(weight, (int, float)) or isinstance(weight, bool)):
        return f"{expected}; weight is {weight!r}"
    return None


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def _trailing_record(line: str) -> dict | None:
    """The whole record at the end of a line that starts with a torn one, if there is one."""
    start = line.find('{"time"', 1)
    while start != -1:
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            start = line.find('{"time"', start + 1)
            continue
        return record if isinstance(record, dict) else None
    return None


@dataclass(frozen=True)
class LoadFailure:
    """A scorer that restore() left out: its spec (spec.optional says whether the server may go without it)
    and why it did not load or failed its probe."""

    spec: ScorerSpec
    reason: str


@dataclass
class RestoreReport:
    """What restore() could not bring back."""

    problems: list[str] = field(default_factory=list)  # every problem as logged: skipped journal lines, scorers
    failed: list[LoadFailure] = field(default_factory=list)  # the scorers left out, optional or not

    @property
    def required(self) -> list[LoadFailure]:
        """The scorers left out that are not optional: the server must not serve without them."""
        return [failure for failure in self.failed if not failure.spec.optional]

    def raise_for_required(self) -> None:
        """ScorerLoadError naming each non-optional scorer that did not load, its path and why."""
        if not self.required:
            return
        parts = [f"scorer {f.spec.name!r} (kind {f.spec.kind}, path {f.spec.path!r}) is not optional and could "
                 f"not be restored: {f.reason}" for f in self.required]
        raise ScorerLoadError("the reward server cannot start: " + "; ".join(parts) + ". Make the path load again, "
                              "or mark the scorer optional (reward.scorers[].optional: true, or `posterrl reward "
                              "add --optional`) to serve without it")


class RewardRegistry:
    """Named scorers, their weights and versions; `score` combines them on a batch.

    Each loaded scorer runs on its own thread (ScorerRunner) so the scorers of a batch run side by side,
    and so a scorer that hangs is abandoned after `timeout_s` (its scores for that batch count as failed)
    instead of freezing every request; while it is still stuck, later batches skip it the same way, until
    a swap replaces it with a scorer (and thread) of its own. A score is dropped, and counted in
    `failures[name][kind]` (kind one of FAILURE_KINDS), when it is not finite, when it lies outside the
    scorer's score_range, or when |score| > max_abs_score.
    """

    def __init__(self, probe: Sequence[EditSample], journal: Journal | None = None, timeout_s: float = 120.0,
                 loader: Callable[[ScorerSpec], Scorer] = load_scorer, max_abs_score: float = DEFAULT_MAX_ABS_SCORE):
        if not probe:
            raise ValueError("the registry needs at least one probe sample to check new scorers on")
        if not max_abs_score > 0:
            raise ValueError(f"max_abs_score must be > 0, got {max_abs_score!r}")
        self.probe = list(probe)
        self.journal = journal or Journal(None)
        self.timeout_s = timeout_s
        self.loader = loader
        self.max_abs_score = float(max_abs_score)
        self._entries: dict[str, Entry] = {}
        self._last_version: dict[str, int] = {}  # never decreases, even across remove and add
        self._lock = threading.Lock()  # guards _entries, _last_version and _runners; never held while loading
        self._change_lock = threading.Lock()  # one change at a time, so probes do not race each other
        self._runners: list[ScorerRunner] = []  # every entry's runner until score() sees it replaced or removed
        self.failures: dict[str, dict[str, int]] = {}  # scorer -> failure kind (FAILURE_KINDS) -> count

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> dict[str, Entry]:
        with self._lock:
            return dict(self._entries)

    def describe(self) -> list[dict]:
        return [entry.describe() for entry in self.snapshot().values()]

    def versions(self) -> dict[str, int]:
        return {name: entry.version for name, entry in self.snapshot().items()}

    # ------------------------------------------------------------------ changes

    def _load_and_probe(self, spec: ScorerSpec) -> Scorer:
        """Load the scorer and check it on the probe batch; RegistryError says what went wrong."""
        try:
            scorer = self.loader(spec)
        except RegistryError:
            raise
        except Exception as exc:  # any load failure must leave the registry as it was
            raise RegistryError(f"scorer {spec.name!r} ({spec.kind}, path={spec.path!r}) failed to load: "
                                f"{type(exc).__name__}: {exc}") from exc
        try:
            batch = scorer.score(self.probe)
        except Exception as exc:
            raise RegistryError(f"scorer {spec.name!r} loaded but failed on the probe batch: "
                                f"{type(exc).__name__}: {exc}") from exc
        scores = np.asarray(batch.scores, dtype=np.float64)
        if scores.shape != (len(self.probe),):
            raise RegistryError(f"scorer {spec.name!r} returned scores of shape {scores.shape} for "
                                f"{len(self.probe)} probe samples")
        if not np.isfinite(scores).any():
            raise RegistryError(f"scorer {spec.name!r} gave no finite score on the {len(self.probe)} probe samples "
                                f"({scores.tolist()})")
        low, high = scorer.score_range
        finite = scores[np.isfinite(scores)]
        if (finite < low).any() or (finite > high).any():
            raise RegistryError(f"scorer {spec.name!r} gave probe scores {finite.tolist()} outside its range "
                                f"[{low}, {high}]")
        if (np.abs(finite) > self.max_abs_score).any():
            raise RegistryError(f"scorer {spec.name!r} gave probe scores {finite.tolist()} beyond "
                                f"max_abs_score {self.max_abs_score:g} (reward.max_abs_score)")
        return scorer

    def _commit(self, spec: ScorerSpec, scorer: Scorer, op: str) -> Entry:
        with self._lock:
            version = self._last_version.get(spec.name, 0) + 1
            entry = Entry(spec, scorer, version, fingerprint(spec))
            self._entries[spec.name] = entry
            self._runners.append(entry.runner)
            self._last_version[spec.name] = version
        self.journal.append(op, spec=asdict(spec), version=version, fingerprint=entry.fingerprint)
        return entry

    def add(self, spec: ScorerSpec) -> Entry:
        with self._change_lock:
            if spec.name in self.snapshot():
                raise RegistryError(f"a scorer named {spec.name!r} is already registered; use swap to replace it")
            problems = spec_problems(spec)
            if problems:
                raise RegistryError(f"scorer {spec.name!r}: {'; '.join(problems)}")
            return self._commit(spec, self._load_and_probe(spec), "add")

    def swap(self, name: str, path: str | None = None, backend: str | None = None, url: str | None = None) -> Entry:
        """Replace a scorer's model (same name, kind and weight), e.g. a newer reward-model checkpoint."""
        with self._change_lock:
            old = self._require(name)
            spec = replace(old.spec, path=path if path is not None else old.spec.path,
                           backend=backend if backend is not None else old.spec.backend,
                           url=url if url is not None else old.spec.url)
            problems = spec_problems(spec)
            if problems:
                raise RegistryError(f"scorer {name!r}: {'; '.join(problems)}")
            return self._commit(spec, self._load_and_probe(spec), "swap")

    def remove(self, name: str) -> dict:
        with self._change_lock:
            entry = self._require(name)
            with self._lock:
                del self._entries[name]
            self.journal.append("remove", name=name, version=entry.version)
            return entry.describe()

    def set_weight(self, name: str, weight: float) -> Entry:
        """Re-weight without reloading: the version stays, the combined reward changes."""
        problem = weight_problem(weight)
        if problem:
            raise RegistryError(f"scorer {name!r}: {problem}")
        with self._change_lock:
            with self._lock:
                entry = self._require(name)
                entry = replace(entry, spec=replace(entry.spec, weight=float(weight)))
                self._entries[name] = entry
            self.journal.append("set_weight", name=name, weight=float(weight), version=entry.version)
            return entry

    def _require(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none"
            raise RegistryError(f"no scorer named {name!r} is registered (registered: {known})")
        return entry

    def restore(self, initial: Sequence[ScorerSpec]) -> RestoreReport:
        """The config's scorers, then every journaled change on top; returns what could not be restored.

        A scorer that no longer loads (its files were deleted, say) is left out and reported in the
        report's `failed` (and `problems`), the versions keep counting from the journal; whether the
        server may serve without it is the caller's call (`RestoreReport.required`). A scorer named in
        `initial` (the config) takes its `optional` from there, even when the journal swapped its model.
        """
        records, problems = self.journal.read()  # torn or misshapen lines are skipped and reported
        report = RestoreReport(problems)
        journal, self.journal = self.journal, Journal(None)  # replaying must not journal again
        try:
            configured = {s.name: s for s in initial}
            specs: dict[str, ScorerSpec] = dict(configured)
            versions: dict[str, int] = {s.name: 1 for s in initial}
            for record in records:
                op = record.get("op")
                if op in ("add", "swap"):
                    spec = ScorerSpec(**record["spec"])  # its shape was checked by read(); old ones lack optional
                    if spec.name in configured:
                        spec = replace(spec, optional=configured[spec.name].optional)
                    specs[spec.name], versions[spec.name] = spec, record["version"]
                elif op == "remove":
                    specs.pop(record["name"], None)
                elif op == "set_weight" and record["name"] in specs:
                    specs[record["name"]] = replace(specs[record["name"]], weight=record["weight"])
            for name, spec in specs.items():
                try:
                    scorer = self._load_and_probe(spec)
                except RegistryError as exc:
                    report.problems.append(str(exc))
                    report.failed.append(LoadFailure(spec, str(exc)))
                    continue
                entry = Entry(spec, scorer, versions[name], fingerprint(spec))
                with self._lock:
                    self._entries[name] = entry
                    self._runners.append(entry.runner)
            with self._lock:
                for record in records:
                    if record.get("op") in ("add", "swap"):
                        name = record["spec"]["name"]
                        self._last_version[name] = max(self._last_version.get(name, 0), record["version"])
                for name, version in versions.items():
                    self._last_version[name] = max(self._last_version.get(name, 0), version)
        finally:
            self.journal = journal
        return report

    # ------------------------------------------------------------------ scoring

    def _count_failure(self, name: str, kind: str, n: int) -> None:
        kinds = self.failures.setdefault(name, {})
        kinds[kind] = kinds.get(kind, 0) + n

    def _retire_runners(self) -> None:
        """Let the threads of scorers no longer registered (swapped or removed) end; a stuck one is abandoned."""
        with self._lock:
            current = {id(entry.runner) for entry in self._entries.values()}
            retired = [runner for runner in self._runners if id(runner) not in current]
            self._runners = [runner for runner in self._runners if id(runner) in current]
        for runner in retired:
            runner.close()  # a later call on it (a change racing this snapshot) would start a fresh thread

    def _out_of_range(self, value: float, score_range: tuple[float, float]) -> str | None:
        if abs(value) > self.max_abs_score:
            return f"score {value:g} out of range: |score| above max_abs_score {self.max_abs_score:g}"
        low, high = score_range
        if not low <= value <= high:
            return f"score {value:g} out of range: outside the scorer's score_range [{low:g}, {high:g}]"
        return None

    def score(self, samples: Sequence[EditSample]) -> list[RewardResult]:
        """Score a batch with one snapshot of the registry, so each result has one consistent set of versions.

        Never raises for a scorer's fault: a scorer that times out, raises or answers with the wrong number
        of scores loses its scores of this batch; one score that is not finite or out of range is dropped
        alone. Either way the sample's reward is None only when that scorer is live (weight != 0).
        """
        entries = self.snapshot()
        n = len(samples)
        futures: dict[str, Future] = {}
        outcome: dict[str, ScoreBatch | _Failed] = {}
        for name, entry in entries.items():
            if entry.runner.stuck():
                outcome[name] = _Failed("timeout", "still busy after an earlier timeout")
                continue
            futures[name] = entry.runner.submit(entry.scorer.score, samples)
        wait(list(futures.values()), timeout=self.timeout_s)
        for name, future in futures.items():
            if not future.done():
                outcome[name] = _Failed("timeout", f"timed out after {self.timeout_s:g} s")
            elif future.exception() is not None:
                exc = future.exception()
                outcome[name] = _Failed("error", f"{type(exc).__name__}: {exc}")
            else:
                outcome[name] = future.result()

        results = [RewardResult(prompt_id=s.prompt_id, reward=0.0, components={}, weights={}, versions={},
                                failed={}) for s in samples]
        for name, entry in entries.items():
            answer = outcome[name]
            checked = answer if isinstance(answer, _Failed) else _checked_answer(answer, n)
            for result in results:
                result.weights[name] = entry.weight
                result.versions[name] = entry.version
            if isinstance(checked, _Failed):  # the whole answer is lost
                self._count_failure(name, checked.kind, n)
                for result in results:
                    result.failed[name] = checked.reason
                    if entry.weight != 0:
                        result.reward = None
                continue
            scores, details = checked
            for i, result in enumerate(results):
                value = float(scores[i])
                problem = _Failed("nonfinite", f"non-finite score ({value})") if not math.isfinite(value) else None
                if problem is None:
                    reason = self._out_of_range(value, entry.scorer.score_range)
                    problem = _Failed("out_of_range", reason) if reason else None
                if problem is None:
                    result.components[name] = value
                    if details[i]:
                        result.details[name] = details[i]
                    if result.reward is not None and entry.weight != 0:
                        result.reward += entry.weight * value
                else:
                    self._count_failure(name, problem.kind, 1)
                    result.failed[name] = problem.reason
                    if entry.weight != 0:
                        result.reward = None
        if not any(entry.weight != 0 for entry in entries.values()):
            for result in results:  # nothing live: a reward of 0 would look like a real score
                result.reward, result.failed["*"] = None, "no live scorer (every weight is 0 or none is registered)"
        self._retire_runners()  # after this batch used them: a runner swapped out meanwhile is done with
        return results

    def close(self) -> None:
        with self._lock:
            runners, self._runners = self._runners, []
        for runner in runners:
            runner.close()


@dataclass(frozen=True)
class _Failed:
    """A scorer's scores of a batch, or one score, that cannot be used."""

    kind: str  # one of FAILURE_KINDS
    reason: str  # what RewardResult.failed says


def _checked_answer(answer: object, n: int) -> tuple[np.ndarray, list] | _Failed:
    """A scorer's answer for n samples as (scores (n,) float64, n details), or a "wrong_length" failure when it
    is not n numbers and n details (a misaligned answer cannot be matched to its samples)."""
    raw = getattr(answer, "scores", None)
    if raw is None:
        return _Failed("wrong_length", f"expected {n} scores, got {type(answer).__name__} without scores")
    try:
        scores = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return _Failed("wrong_length", f"expected {n} numeric scores, got {type(exc).__name__}: {exc}")
    if scores.shape != (n,):
        return _Failed("wrong_length", f"expected {n} scores, got shape {scores.shape}")
    details = getattr(answer, "details", None)
    if not isinstance(details, (list, tuple)) or len(details) != n:
        got = f"{len(details)}" if isinstance(details, (list, tuple)) else type(details).__name__
        return _Failed("wrong_length", f"expected {n} details, got {got}")
    return scores, list(details)
