"""The learner role: one rank of a DeepSpeed data-parallel group, training whatever task a stage starts.

A plain class (no Ray): actors/ starts N of them as Ray actors, tests run one in-process at world
size 1. The core owns what every stage shares: the process group (joined from explicit coordinates,
gloo on CPU, NCCL on GPU), the DeepSpeed engine, the one optimizer-step loop, step statistics and
checkpoints. What is trained and how (model, micro-batch loss, extra state, export) is the task's:
learner/tasks/, chosen by name in `learner.tasks.TASKS`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from learner.distributed import deepspeed, deepspeed_config, dist, join_process_group, train_dtype, warmup_lambda
from learner.safe_load import load_rng_state, save_rng_state, use_tensor_only_loads
from learner.tasks import TASKS, NftTask, RewardModelTask, TaskState, TrainingTask
from posterrl.checkpoints import LATEST_FILE, step_of, usable_checkpoint, write_checkpoint_manifest
from posterrl.config import Config
from posterrl.files import write_atomic
from posterrl.models.pipeline_policy import PipelinePolicy
from posterrl.models.samples import PreferencePair
from posterrl.policies import SAMPLING_DTYPES
from posterrl.policy import quiet_model_libraries
from posterrl.weight_sync import Fingerprint, fingerprint, open_store

TASK_TENSORS_FILE = "task_state.safetensors"  # a task's own tensors (theta_old in the rl stage), rank 0
RNG_FILE = "rng_rank{rank}.safetensors"  # each rank's torch/numpy/python RNG states (learner/safe_load.py)
T = TypeVar("T")


@dataclass
class StepStats:
    """One optimizer step, averaged over micro batches and ranks."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    samples: int  # rows, samples or pairs in the global batch
    extra: dict[str, float]  # the task loss's other statistics


class Learner:
    def __init__(self, config: dict, rank: int, world_size: int, num_threads: int | None = None):
        quiet_model_libraries()
        # ZeRO-2 and ZeRO-3 call collectives that torch marks deprecated; the warnings repeat every step.
        warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                                category=FutureWarning)
        self.config = Config.model_validate(config)
        self.rank, self.world_size = rank, world_size
        if num_threads:
            torch.set_num_threads(num_threads)
        use_gpu = torch.cuda.is_available() and self.config.learner.gpus_per_rank > 0
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.task: TrainingTask | None = None  # set by start(), one per stage
        self.task_name = ""
        self.engine: Any = None  # the task's DeepSpeed engine
        self.scheduler: Any = None
        self.step, self.seed = 0, 0
        self._rendezvous: dist.TCPStore | None = None  # rank 0: the stores other processes join
        self._broadcast_store: dist.TCPStore | None = None

    def open_rendezvous(self, host: str) -> int:
        """Rank 0: open the learner group's rendezvous store on `host` (bound now); returns its port."""
        self._rendezvous = open_store(host, self.world_size)
        return self._rendezvous.port

    def join(self, master_addr: str, master_port: int) -> int:
        """Join the learner process group before any DeepSpeed engine starts (rank 0 after open_rendezvous)."""
        store = self._rendezvous if self.rank == 0 else None
        return join_process_group(self.rank, self.world_size, master_addr, master_port, self.device, store)

    # ------------------------------------------------------------------ tasks and steps

    def start(self, task: str, seed: int, **inputs: Any) -> int:
        """A fresh task (learner.tasks.TASKS[task], given `inputs`) in a fresh DeepSpeed engine; returns the
        number of trainable parameters."""
        self.task_name, self.seed, self.step = task, seed, 0
        self.task = TASKS[task](self.config, self.device, seed, **inputs)
        model = self.task.build()
        if self.zero3 and isinstance(model, PipelinePolicy):  # validation allows ZeRO-3 with LoRA policies only
            model.keep_frozen_out_of_module(self.device, train_dtype(self.config))
        trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: adapters and head only
        trainable_numel = sum(p.numel() for p in trainable)  # counted now: ZeRO-3 leaves each rank a shard
        lc = self.config.learner
        optimizer = torch.optim.AdamW(trainable, lr=self.task.lr, weight_decay=lc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(lc.warmup_steps))
        ds_config = deepspeed_config(self.config, self.task.batch_size, self.task.micro_batch_size)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        use_tensor_only_loads(self.engine)  # checkpoints load as tensors and plain data (learner/safe_load.py)
        return trainable_numel

    def train_step(self, batch: Sequence) -> StepStats:
        """One optimizer step on a global batch (rows, rl samples or pair indices, as the task takes them):
        this rank's share, cut into micro batches, DeepSpeed accumulating over them."""
        task = self._running()
        self.engine.train()
        share = batch[self.rank :: self.world_size]
        micro = [share[i : i + task.micro_batch_size] for i in range(0, len(share), task.micro_batch_size)]
        totals: dict[str, float] = {}
        for index, chunk in enumerate(micro):
            loss, stats = task.micro_loss(self.engine, chunk, self._generator(index))
            self.engine.backward(loss)
            self.engine.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / len(micro)
        self.step += 1
        return self._step_stats(totals, len(batch))

    def _generator(self, index: int) -> torch.Generator:
        """Noise and timesteps of micro batch `index` at this step and rank: fixed by (seed, step, rank, index)."""
        return torch.Generator().manual_seed(hash((self.seed, self.step, self.rank, index)) & 0x7FFFFFFF)

    def _step_stats(self, totals: dict[str, float], samples: int) -> StepStats:
        """Average per-rank stats over ranks, so the driver sees the global batch."""
        grad_norm = self.engine.get_global_grad_norm()
        keys = sorted(totals)
        # on the rank's device: an NCCL group reduces CUDA tensors only
        reduced = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(reduced)
        averaged = {k: v / self.world_size for k, v in zip(keys, reduced.cpu().tolist(), strict=True)}
        return StepStats(step=self.step, loss=averaged.pop("loss"), grad_norm=float(grad_norm or 0.0),
                         lr=self.scheduler.get_last_lr()[0], samples=samples, extra=averaged)

    def _running(self) -> TrainingTask:
        if self.task is None:
            raise RuntimeError("the learner runs no task: call start() first")
        return self.task

    def _require(self, kind: type[T]) -> T:
        """The running task, which must be a `kind` (a method of one stage called in another is a bug)."""
        if self.task is None or not isinstance(self.task, kind):
            raise RuntimeError(f"the learner runs task {self.task_name or 'none'!r}, not {kind.__name__}")
        return self.task

    @property
    def zero3(self) -> bool:
        return self.config.deepspeed.zero_stage == 3

    def _whole_parameters(self, trained_only: bool = True) -> Any:
        """Read whole parameters inside: under ZeRO-3 each rank holds a shard of each, gathered here (every rank
        must enter); a no-op under ZeRO 0-2. By default the trained ones only (with LoRA the adapters: what
        policy_state, the soft update and exports read), so the sharded base is never gathered whole."""
        parameters = [p for p in self.module.parameters() if p.requires_grad or not trained_only]
        return deepspeed.zero.GatheredParameters(parameters, enabled=self.zero3)

    @property
    def module(self) -> torch.nn.Module:
        """The module being trained (the policy, or the reward model in the reward stage)."""
        return self.engine.module

    # ------------------------------------------------------------------ what only some tasks do

    def update_sampling_policy(self) -> float:
        with self._whole_parameters():
            return self._require(NftTask).update_sampling_policy(self.module)

    def sampling_weights(self) -> dict[str, np.ndarray]:
        return self._require(NftTask).sampling_weights()

    def open_weight_broadcast(self, host: str, world_size: int) -> int:
        """Rank 0: open the weight broadcast group's store on `host` (bound now); returns its port."""
        self._broadcast_store = open_store(host, world_size)
        return self._broadcast_store.port

    def join_weight_broadcast(self, master_addr: str, master_port: int, world_size: int) -> None:
        self._require(NftTask).join_weight_broadcast(master_addr, master_port, world_size, self._broadcast_store)

    def broadcast_sampling_weights(self) -> int:
        return self._require(NftTask).broadcast_sampling_weights()

    def sampling_fingerprint(self) -> Fingerprint:
        """theta_old's fingerprint: what every rollout actor must hold after a sync (posterrl/weight_sync.py)."""
        # as the actors hold it: rounded to rollout.dtype on their load
        return fingerprint(self._require(NftTask).sampling_state, as_dtype=SAMPLING_DTYPES[self.config.rollout.dtype])

    def sampling_probe(self) -> torch.Tensor:
        return self._require(NftTask).sampling_probe(self.module)

    def sampling_checksum(self) -> float:
        """Sum of theta_old's parameters (tests follow the soft update with it)."""
        return self._require(NftTask).sampling_checksum()

    def pair_scores(self, pairs: list[PreferencePair]) -> tuple[list[float], list[float]]:
        return self._require(RewardModelTask).pair_scores(self.module, pairs)

    # ------------------------------------------------------------------ state

    def current_step(self) -> int:
        """Optimizer steps of the current stage (the driver's TensorBoard x axis follows it)."""
        return self.step

    def parameter_checksum(self) -> float:
        """Sum of all the module's parameters (tests compare it across ranks)."""
        with self._whole_parameters(trained_only=False):
            return _checksum(self.module)

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The trained policy's policy_state() (all weights, or the adapters with LoRA) in fp32 on CPU."""
        with self._whole_parameters():
            state = self.module.policy_state()  # type: ignore[operator]
            return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    def save_checkpoint(self, directory: str, client_state: dict, keep_last: int = 2) -> str:
        """DeepSpeed checkpoint under directory/step_N; `latest.json` moves only once every rank is done.

        A crash mid-save leaves latest.json on the previous, complete checkpoint.
        """
        task = self._running()
        root, tag = Path(directory), f"step_{self.step:07d}"
        task_state = task.state()
        state = {**client_state, "step": self.step, "task": self.task_name, "seed": self.seed,
                 "task_state": task_state.info}
        # A frozen base (LoRA) is rebuilt from its checkpoint on resume: only the trained tensors are saved.
        self.engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False,
                                    exclude_frozen_parameters=self._has_frozen_parameters())
        save_rng_state(root / tag / RNG_FILE.format(rank=self.rank))
        if task_state.tensors and self.rank == 0:  # the same on every rank
            save_file(task_state.tensors, str(root / tag / TASK_TENSORS_FILE))
        dist.barrier()
        if self.rank == 0:  # every rank has written: list the folder's files, then point latest.json at it
            write_checkpoint_manifest(root / tag)
            write_atomic(root / LATEST_FILE, json.dumps({"tag": tag, "step": self.step}))
            prune_checkpoints(root, tag, keep_last)
        dist.barrier()
        return tag

    def load_checkpoint(self, directory: str) -> dict:
        """Restore the newest complete checkpoint whose files match its manifest (else the one before it, said
        so on stdout); returns its client state (step, data position...)."""
        task = self._running()
        root = Path(directory)
        tag = usable_checkpoint(root, report=lambda message: print(f"learner rank {self.rank}: {message}", flush=True))
        _, client_state = self.engine.load_checkpoint(str(root), tag=tag,
                                                      load_module_strict=not self._has_frozen_parameters())
        load_rng_state(root / tag / RNG_FILE.format(rank=self.rank))
        self.step, self.seed = client_state["step"], client_state["seed"]
        tensors_file = root / tag / TASK_TENSORS_FILE
        tensors = load_file(str(tensors_file)) if tensors_file.is_file() else {}
        task.load_state(TaskState(client_state["task_state"], tensors))
        return client_state

    def _has_frozen_parameters(self) -> bool:
        return any(not p.requires_grad for p in self.module.parameters())

    def export(self, directory: str) -> str:
        """What the stage hands on, written by rank 0: the trained policy in diffusers layout (in the rl
        stage theta_old, the policy the rollouts came from), or the reward model."""
        with self._whole_parameters():
            if self.rank == 0:
                self._running().export(self.module, directory)
        dist.barrier()
        return directory

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self._rendezvous = self._broadcast_store = None  # closes their listening sockets


def prune_checkpoints(root: Path, current: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders up to `current` (the one latest.json names, always
    kept). Folders of a higher step (an earlier run of the stage in the same run dir) are not latest.json's
    history and are left alone: sorting by name alone could prune the checkpoint just written."""
    step = step_of(current)
    older = sorted((s, p.name) for p in root.iterdir() if p.is_dir() and (s := step_of(p.name)) is not None
                   and p.name != current and step is not None and s < step)
    for _, old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(root / old, ignore_errors=True)


def _checksum(module: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in module.parameters()))
