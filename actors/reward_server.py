"""The reward server: one named Ray actor per run around `reward_server.registry.RewardRegistry`.

It is an async actor: every `score` call is a coroutine that joins the dynamic batcher, so many
rollout actors can ask at once and are scored together. Registry changes (from `posterrl reward
...` in another process) load and probe on a worker thread while scoring goes on. The actor is
started with unlimited restarts and its calls with retries: a restarted server replays the run's
journal and comes back with the same scorers and versions, and the calls that were in flight when
its process died run again there. A scorer that is not `optional` and does not load stops the
server from starting (ScorerLoadError) rather than letting it serve a different reward.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from torch.utils.tensorboard import SummaryWriter

from actors.cluster import auth_info, threads_for
from actors.faults import RunAborted
from posterrl.config import Config
from posterrl.data.tasks import TASKS, build_samples
from posterrl.files import write_atomic
from posterrl.models.samples import EditSample
from posterrl.runlog import CLUSTER_FILE, RunDir
from reward_server.batching import DynamicBatcher
from reward_server.registry import (
    JOURNAL_FILE,
    Journal,
    RegistryError,
    RewardRegistry,
    RewardResult,
    ScorerLoadError,
    ScorerSpec,
)

NAMESPACE = "posterrl"
GIL_SWITCH_INTERVAL_S = 0.0002
log = logging.getLogger("posterrl.reward_server")


def server_name(run_dir: str | Path) -> str:
    """The actor name of a run's reward server: one per run directory."""
    return "reward-server-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def probe_samples(config: Config, n: int) -> list[EditSample]:
    """Perfect edits (output = target) of generated posters: every scorer must score these finitely."""
    samples: list[EditSample] = []
    index = 0
    while len(samples) < n:
        for sample in build_samples(10_000 + index, config.data.seed, config.data.size, TASKS, split="probe"):
            assert sample.target is not None  # every task builder returns a target
            samples.append(EditSample(sample.id, sample.task, sample.instruction, sample.inputs, sample.target,
                                      sample.meta, sample.target))
        index += 1
    return samples[:n]


def initial_specs(config: Config, run: RunDir) -> list[ScorerSpec]:
    """The config's scorers; a bradley_terry scorer without a path serves what the reward stage exported."""
    return [ScorerSpec(name=s.name, kind=s.kind, weight=s.weight,
                       path=s.path if s.path is not None or s.kind != "bradley_terry"
                       else str(run.stage_checkpoint("reward")),
                       backend=s.backend, url=s.url, api_key_env=s.api_key_env, optional=s.optional)
            for s in config.reward.scorers]


class RewardServer:
    def __init__(self, config: dict, run_dir: str):
        cfg = Config.model_validate(config)
        torch.set_num_threads(threads_for(cfg.reward.cpus))
        # The event loop (receiving requests) and the scoring threads share the GIL; at the default 5 ms
        # switch interval a scorer that gives the GIL up for each torch op can wait 5 ms to get it back.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.run = RunDir(run_dir)
        self.registry = RewardRegistry(probe_samples(cfg, cfg.reward.probe_size),
                                       Journal(self.run.root / JOURNAL_FILE), cfg.reward.request_timeout_s,
                                       max_abs_score=cfg.reward.max_abs_score)
        restored = self.registry.restore(initial_specs(cfg, self.run))
        self.restore_problems = restored.problems
        for problem in self.restore_problems:
            log.error("reward server: %s", problem)
        restored.raise_for_required()  # ScorerLoadError: Ray marks the actor dead and every caller gets the message
        self.writer = SummaryWriter(str(self.run.tb / "reward_server"))
        self.batcher = DynamicBatcher(self.registry.score, cfg.reward.max_batch_size, cfg.reward.max_wait_ms / 1000)
        self.step = 0  # the driver's global step, so changes line up with training curves
        self.changes = 0
        self._failures_logged: dict[str, int] = {}
        self._log_change("start", ", ".join(f"{e['name']} v{e['version']} (weight {e['weight']:g})"
                                            for e in self.registry.describe()) or "no scorers")

    # ------------------------------------------------------------------ scoring

    async def score(self, samples: list[EditSample], step: int | None = None) -> list[RewardResult]:
        if step is not None:
            self.step = max(self.step, step)
        results = await self.batcher.submit(samples)
        self._log_failures()
        return results

    def _log_failures(self) -> None:
        for name, kinds in self.registry.failures.items():
            total = sum(kinds.values())
            if total != self._failures_logged.get(name, 0):
                self._failures_logged[name] = total
                self.writer.add_scalar(f"reward/{name}/dropped", total, self.step)
                log.warning("reward server: scorer %s has dropped %d scores so far (%s)", name, total, kinds)

    # ------------------------------------------------------------------ registry changes

    def _log_change(self, op: str, text: str) -> None:
        self.changes += 1
        self.writer.add_text("reward/changes", f"step {self.step}: **{op}** {text}", self.changes)
        for entry in self.registry.describe():
            self.writer.add_scalar(f"reward/{entry['name']}/version", entry["version"], self.step)
            self.writer.add_scalar(f"reward/{entry['name']}/weight", entry["weight"], self.step)
        self.writer.flush()

    async def _change(self, op: str, fn, *args) -> dict:
        """Run a registry change on a worker thread; a failure is returned, never raised, and changes nothing."""
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except RegistryError as exc:
            self.writer.add_text("reward/changes", f"step {self.step}: **{op} refused** {exc}", self.changes + 1)
            self.writer.flush()
            return {"ok": False, "error": str(exc)}
        described = outcome if isinstance(outcome, dict) else outcome.describe()
        self._log_change(op, f"{described['name']} -> version {described['version']}, weight {described['weight']:g}"
                             f", path {described.get('path')}")
        return {"ok": True, "scorer": described}

    async def add(self, spec: dict) -> dict:
        return await self._change("add", self.registry.add, ScorerSpec(**spec))

    async def swap(self, name: str, path: str | None = None, backend: str | None = None,
                   url: str | None = None) -> dict:
        return await self._change("swap", self.registry.swap, name, path, backend, url)

    async def remove(self, name: str) -> dict:
        return await self._change("remove", self.registry.remove, name)

    async def set_weight(self, name: str, weight: float) -> dict:
        return await self._change("set_weight", self.registry.set_weight, name, weight)

    # ------------------------------------------------------------------ inspection

    async def describe(self) -> dict:
        return {"scorers": self.registry.describe(), "stats": self.batcher.stats.as_dict(),
                "failures": self.registry.failures, "restore_problems": self.restore_problems,
                "pid": os.getpid(), "step": self.step}

    async def latencies(self) -> list[float]:
        return list(self.batcher.stats.latencies_s)


def start_reward_server(config: Config, run: RunDir) -> ray.actor.ActorHandle:
    """The run's reward server, started if it is not running (get_if_exists), and the run's address on disk."""
    rc = config.reward
    actor = ray.remote(RewardServer).options(
        name=server_name(run.root), namespace=NAMESPACE, get_if_exists=True,
        num_cpus=rc.cpus, num_gpus=rc.gpus, resources=rc.resources or None, max_restarts=-1, max_task_retries=3,
        max_concurrency=1000,
    ).remote(config.to_dict(), str(run.root))
    try:  # waits until the registry has loaded and probed its scorers
        ray.get(actor.describe.remote(), timeout=config.cluster.call_timeout_s)
    except RayActorError as exc:  # its constructor raised: a required scorer did not load
        text = str(exc)
        marker = f"{ScorerLoadError.__name__}: "
        # the last one is the raise (the traceback quotes the source line's comment before it)
        reason = text[text.rindex(marker) + len(marker):].strip() if marker in text else text
        raise ScorerLoadError(f"the reward server did not start: {reason}") from None
    except GetTimeoutError:
        raise RunAborted(f"the reward server did not start within {config.cluster.call_timeout_s:g} s "
                         "(cluster.call_timeout_s): its scorers load and probe in its constructor") from None
    write_cluster_file(run)
    return actor


def write_cluster_file(run: RunDir) -> None:
    info = {"address": ray.get_runtime_context().gcs_address, "namespace": NAMESPACE,
            "reward_server": server_name(run.root), **auth_info()}
    # `posterrl reward` never reads a half-written file (posterrl/files.py)
    write_atomic(run.root / CLUSTER_FILE, json.dumps(info, indent=2) + "\n")


def find_reward_server(run_dir: str | Path) -> ray.actor.ActorHandle:
    """The live reward server of a run (the caller is connected to the run's cluster)."""
    name = server_name(run_dir)
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise RegistryError(f"no reward server is running for run {run_dir} (actor {name!r} in namespace "
                            f"{NAMESPACE!r} not found in this Ray cluster); is the run still in its reward "
                            "or rl stage?") from None

