"""The learner role: one rank of a DeepSpeed data-parallel group training the edit policy.

A plain class (no Ray): actors/ starts N of them as Ray actors, tests run one in-process at world
size 1. Each rank joins torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (gloo on
CPU, NCCL on GPU) before DeepSpeed starts, so DeepSpeed never tries MPI discovery.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, so DeepSpeed does not probe and warn

import deepspeed  # noqa: E402

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it starts
# (deepspeed/comm/torch.py, build_shm_op), used only by inference_all_reduce, which training never
# calls. The compile holds a lock file in the torch extensions folder: a process killed mid-compile
# leaves the lock behind and every later DeepSpeed start, in any venv, waits on it forever (seen on
# this project's machines). Marked incompatible, build_shm_op returns None and gloo does every
# collective; on GPU the op is not built anyway.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402

from learner.bt_loss import bradley_terry_loss  # noqa: E402
from learner.flow import draw_flow_inputs, draw_grid_flow_inputs  # noqa: E402
from learner.losses import distillation_loss, flow_matching_loss, pick_expert_velocity
from learner.nft import NftHyper, nft_loss, sampling_policy_eta, soft_update
from posterrl.batch import RlSample, collate, on_device, stack_rl_samples
from posterrl.config import Config
from posterrl.data.manifest import ManifestRow
from posterrl.data.tasks import REGIME
from posterrl.flow import flow_sigmas
from posterrl.policy import EditPolicy, quiet_model_libraries
from posterrl.weight_sync import BroadcastGroup, trainable_tensors
from reward_server.bradley_terry import build_reward_model, pair_sides, save_reward_model
from reward_server.types import PreferencePair

LATEST_FILE = "latest.json"
SAMPLING_POLICY_FILE = "sampling_policy.pt"


def deepspeed_config(config: Config, batch_size: int | None = None, micro_batch_size: int | None = None) -> dict:
    """The DeepSpeed config of a training stage; batch sizes default to the policy stages' (learner.*)."""
    lr, ds = config.learner, config.deepspeed
    batch_size, micro_batch_size = batch_size or lr.batch_size, micro_batch_size or lr.micro_batch_size
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": batch_size // (lr.num_ranks * micro_batch_size),
        "gradient_clipping": lr.grad_clip,
        "zero_optimization": {
            "stage": ds.zero_stage,
            **({"offload_optimizer": {"device": "cpu"}} if ds.offload_optimizer else {}),
        },
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,  # progress is ours; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def warmup_lambda(warmup_steps: int):
    """Linear warm-up to the base learning rate, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@dataclass
class StepStats:
    step: int
    loss: float
    grad_norm: float
    lr: float
    samples: int
    extra: dict[str, float]


class Learner:
    def __init__(self, config: dict, rank: int, world_size: int, num_threads: int | None = None):
        quiet_model_libraries()
        # ZeRO-2 calls a collective that torch marks deprecated; the warning repeats every step.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
        self.config = Config.model_validate(config)
        self.rank, self.world_size = rank, world_size
        if num_threads:
            torch.set_num_threads(num_threads)
        use_gpu = torch.cuda.is_available() and self.config.learner.gpus_per_rank > 0
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.engine = None
        self.experts: dict[str, EditPolicy] = {}
        self.sampling_policy: EditPolicy | None = None  # rl stage: theta_old, what the rollouts sample with
        self.reference: EditPolicy | None = None  # rl stage: the starting weights, for the KL term
        self.sampling_updates = 0  # soft updates of theta_old so far (eta's schedule counts them)
        self.weight_group: BroadcastGroup | None = None  # rank 0, rollout.weight_sync=broadcast
        self.step, self.stage, self.seed = 0, "", 0

    @staticmethod
    def free_address() -> tuple[str, int]:
        """This host's address and a free TCP port (rank 0 calls it for the rendezvous)."""
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as sock:
            sock.bind(("", 0))
            return host, sock.getsockname()[1]

    def join(self, master_addr: str, master_port: int) -> int:
        """Join the process group (gloo on CPU, NCCL on GPU) before any DeepSpeed engine starts."""
        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": "0",
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        return dist.get_rank()

    # ------------------------------------------------------------------ setup

    def start_stage(self, stage: str, policy_state: dict[str, torch.Tensor] | None, seed: int,
                    lr: float | None = None, batch_size: int | None = None) -> int:
        """A fresh DeepSpeed engine (optimizer, schedule) for `stage`, from given weights or config init.

        lr and batch_size default to the sft/distill ones (learner.lr, learner.batch_size).
        """
        self.stage, self.seed, self.step = stage, seed, 0
        self.sampling_policy = self.reference = None
        policy = EditPolicy.from_config(self.config.model, self.config.rollout)
        if policy_state is not None:
            policy.load_state_dict(policy_state)
        lc = self.config.learner
        optimizer = torch.optim.AdamW(policy.parameters(), lr=lr or lc.lr, weight_decay=lc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(lc.warmup_steps))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.config, batch_size), dist_init_required=False,
        )
        return sum(p.numel() for p in policy.parameters())

    def set_experts(self, expert_states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """Frozen experts, one per regime, held beside the student on every rank (teacher forwards only)."""
        self.experts = {}
        for regime, state in expert_states.items():
            expert = EditPolicy.from_config(self.config.model, self.config.rollout)
            expert.load_state_dict(state)
            self.experts[regime] = expert.to(self.device).eval().requires_grad_(False)
        return sorted(self.experts)

    @property
    def policy(self) -> EditPolicy:
        return self.engine.module  # in the policy stages (sft, distill, rl)

    # ------------------------------------------------------------------ training

    def _micro_batches(self, rows: Sequence) -> list[Sequence]:
        """This rank's share of a global batch (manifest rows or rl samples), cut into micro batches."""
        share = rows[self.rank :: self.world_size]
        mb = self.config.learner.micro_batch_size
        return [share[i : i + mb] for i in range(0, len(share), mb)]

    def _optimizer_step(self, batch: Sequence, micro_loss) -> StepStats:
        """One optimizer step on a global batch: micro_loss(index, micro batch) -> (loss, stats) for each of
        this rank's micro batches, DeepSpeed accumulating over them; stats averaged over micro batches and ranks."""
        self.engine.train()
        micro = self._micro_batches(batch)
        totals: dict[str, float] = {}
        for index, chunk in enumerate(micro):
            loss, stats = micro_loss(index, chunk)
            self.engine.backward(loss)
            self.engine.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / len(micro)
        self.step += 1
        return self._step_stats(totals, len(batch))

    def _generator(self, index: int) -> torch.Generator:
        """Noise and timesteps of micro batch `index` at this step and rank: fixed by (seed, step, rank, index)."""
        return torch.Generator().manual_seed(hash((self.seed, self.step, self.rank, index)) & 0x7FFFFFFF)

    def train_step(self, rows: Sequence[ManifestRow], objective: str = "sft") -> StepStats:
        """One optimizer step on a global batch (all rows share their number of inputs)."""

        def micro_loss(index: int, chunk: Sequence[ManifestRow]):
            batch = collate(chunk, self.config.model.resolution)
            dtype = next(self.policy.parameters()).dtype  # bf16 when DeepSpeed runs in bf16
            x0 = batch.targets.to(self.device, dtype)  # (b, 3, R, R)
            x_t, t, eps = draw_flow_inputs(x0, self._generator(index))  # (b, 3, R, R), (b,), (b, 3, R, R)
            ids, mask = self.policy.tokenize(batch.instructions)
            inputs = batch.inputs.to(self.device, dtype)
            v = self.engine(x_t, t, ids, mask, inputs)  # (b, 3, R, R)
            return OBJECTIVES[objective](self, v, x0, eps, x_t, t, ids, mask, inputs, batch.tasks)

        return self._optimizer_step(rows, micro_loss)

    def _sft_objective(self, v, x0, eps, x_t, t, ids, mask, inputs, tasks):
        return flow_matching_loss(v, x0, eps)

    def _distill_objective(self, v, x0, eps, x_t, t, ids, mask, inputs, tasks):
        with torch.no_grad():
            is_global = torch.tensor([REGIME[task] == "global" for task in tasks], device=self.device)  # (b,)
            v_local = self.experts["local"](x_t, t, ids, mask, inputs)  # (b, 3, R, R)
            v_global = self.experts["global"](x_t, t, ids, mask, inputs)  # (b, 3, R, R)
        v_expert = pick_expert_velocity(v_local, v_global, is_global)  # (b, 3, R, R)
        return distillation_loss(v, v_expert, x0, eps, self.config.learner.lambda_expert)

    # ------------------------------------------------------------------ DiffusionNFT (the rl stage)

    def start_rl_stage(self, policy_state: dict[str, torch.Tensor], seed: int) -> int:
        """theta in a fresh DeepSpeed engine (lr rl.lr), beside two frozen copies of the starting weights:
        the sampling policy theta_old (what rollouts use; soft-updated after each epoch) and the
        reference the KL term anchors to (left out when rl.kl_coef is 0).

        Every rank holds the same theta_old: ZeRO-2 keeps whole parameters on each rank and the soft
        update is deterministic, so no rank has to broadcast it.
        """
        rl = self.config.rl
        count = self.start_stage("rl", policy_state, seed, lr=rl.lr, batch_size=rl.batch_size)
        self.sampling_policy = self._frozen_copy(policy_state)
        self.reference = self._frozen_copy(policy_state) if rl.kl_coef > 0 else None
        self.nft = NftHyper(beta=rl.beta, adv_max=rl.adv_max, kl_coef=rl.kl_coef)
        rc = self.config.rollout
        self.time_grid = flow_sigmas(rc.num_steps, rc.shift)[:-1]  # (S,) the rollout's steps; 0 is no step
        self.sampling_updates = 0
        return count

    def _frozen_copy(self, state: dict[str, torch.Tensor]) -> EditPolicy:
        policy = EditPolicy.from_config(self.config.model, self.config.rollout)
        policy.load_state_dict(state)
        dtype = next(self.policy.parameters()).dtype  # bf16 when DeepSpeed runs in bf16
        return policy.to(self.device, dtype).eval().requires_grad_(False)

    def train_rl_step(self, samples: Sequence[RlSample]) -> StepStats:
        """One optimizer step of the NFT loss on a global batch of scored rollout samples (one number of inputs)."""
        dtype = next(self.policy.parameters()).dtype

        def micro_loss(index: int, chunk: Sequence[RlSample]):
            instructions, inputs, x0, r = stack_rl_samples(chunk)  # (b, N, 3, R, R), (b, 3, R, R), (b,)
            x0, inputs, r = x0.to(self.device, dtype), inputs.to(self.device, dtype), r.to(self.device)
            x_t, t, _ = draw_grid_flow_inputs(x0, self.time_grid, self._generator(index))  # (b, 3, R, R), (b,)
            ids, mask = self.policy.tokenize(instructions)
            v = self.engine(x_t, t, ids, mask, inputs)  # (b, 3, R, R)
            with torch.no_grad():
                v_old = self.sampling_policy(x_t, t, ids, mask, inputs)  # (b, 3, R, R)
                v_ref = self.reference(x_t, t, ids, mask, inputs) if self.reference is not None else None
            return nft_loss(v, v_old, v_ref, x0, x_t, t, r, self.nft)

        return self._optimizer_step(samples, micro_loss)

    def update_sampling_policy(self) -> float:
        """theta_old <- eta theta_old + (1 - eta) theta after an epoch; returns the eta used."""
        rl = self.config.rl
        eta = sampling_policy_eta(self.sampling_updates, rl.eta_rate, rl.eta_max)
        soft_update(self.sampling_policy.parameters(), self.policy.parameters(), eta)
        self.sampling_updates += 1
        return eta

    def sampling_weights(self) -> dict[str, np.ndarray]:
        """theta_old as fp32 numpy arrays: the object store reads numpy without copies on every actor."""
        return {k: v.detach().float().cpu().numpy() for k, v in self.sampling_policy.state_dict().items()}

    def join_weight_broadcast(self, master_addr: str, master_port: int, world_size: int) -> None:
        """Rank 0 only: host the broadcast group to the rollout workers (NCCL on GPU, gloo on CPU)."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.weight_group = BroadcastGroup(master_addr, master_port, 0, world_size, backend)

    def broadcast_sampling_weights(self) -> int:
        """Send theta_old to every rollout worker of the broadcast group; returns the bytes sent."""
        return self.weight_group.broadcast(trainable_tensors(self.sampling_policy))

    def sampling_checksum(self) -> float:
        """Sum of theta_old's parameters (tests follow the soft update with it)."""
        return _checksum(self.sampling_policy)

    def _step_stats(self, totals: dict[str, float], samples: int) -> StepStats:
        """Average per-rank stats over ranks, so the driver sees the global batch."""
        grad_norm = self.engine.get_global_grad_norm()
        keys = sorted(totals)
        reduced = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(reduced)
        totals = {k: float(v) / self.world_size for k, v in zip(keys, reduced)}
        return StepStats(step=self.step, loss=totals.pop("loss"), grad_norm=float(grad_norm or 0.0),
                         lr=self.scheduler.get_last_lr()[0], samples=samples, extra=totals)

    # ------------------------------------------------------------------ Bradley-Terry reward model

    def start_reward_stage(self, spec: dict, pairs: list[PreferencePair], seed: int) -> int:
        """A reward model (backbone + scalar head) in a fresh DeepSpeed engine, with the stage's training pairs.

        The pairs are sent once and indexed by every step: each step's pairs are cut from the same list
        on every rank, so only indices travel.
        """
        bt = self.config.reward.bt
        self.stage, self.seed, self.step = "reward", seed, 0
        torch.manual_seed(seed)
        model = build_reward_model(spec)
        trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: adapters and head only
        optimizer = torch.optim.AdamW(trainable, lr=bt.lr, weight_decay=self.config.learner.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(self.config.learner.warmup_steps))
        per_rank = bt.batch_size // self.world_size
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.config, bt.batch_size, per_rank), dist_init_required=False,
        )
        self.pairs = pairs
        return sum(p.numel() for p in trainable)

    def train_reward_step(self, indices: Sequence[int]) -> StepStats:
        """One optimizer step of the Bradley-Terry loss on the pairs at `indices` (a global batch)."""
        bt = self.config.reward.bt
        self.engine.train()
        model = self.engine.module
        chosen, rejected, tie = pair_sides([self.pairs[i] for i in indices[self.rank :: self.world_size]])
        chosen, rejected = model.prepare(chosen), model.prepare(rejected)
        if bt.augment:
            generator = torch.Generator().manual_seed(hash((self.seed, self.step, self.rank)) & 0x7FFFFFFF)
            model.augment_pairs(chosen, rejected, generator)
        r_chosen = self.engine(**self._on_device(chosen))  # (b,)
        r_rejected = self.engine(**self._on_device(rejected))  # (b,)
        loss, stats = bradley_terry_loss(r_chosen, r_rejected, tie.to(self.device), bt.margin, bt.ties, bt.tie_theta)
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        return self._step_stats({k: float(v) for k, v in stats.items()}, len(indices))

    @torch.no_grad()
    def reward_pair_scores(self, pairs: list[PreferencePair], batch_size: int = 64) -> tuple[list[float], list[float]]:
        """Rewards of chosen and rejected for held-out pairs (no gradient, eval mode)."""
        self.engine.eval()
        model, chosen, rejected = self.engine.module, [], []
        for start in range(0, len(pairs), batch_size):
            sides = pair_sides(pairs[start : start + batch_size])
            chosen += model(**self._on_device(model.prepare(sides[0]))).float().cpu().tolist()
            rejected += model(**self._on_device(model.prepare(sides[1]))).float().cpu().tolist()
        return chosen, rejected

    def _on_device(self, prepared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return on_device(prepared, self.device, next(self.engine.module.parameters()).dtype)

    def export_reward_model(self, directory: str) -> str:
        if self.rank == 0:
            save_reward_model(self.engine.module, directory)
        dist.barrier()
        return directory

    def current_step(self) -> int:
        """Optimizer steps of the current stage (the driver's TensorBoard x axis follows it)."""
        return self.step

    def parameter_checksum(self) -> float:
        """Sum of all parameters (tests compare it across ranks)."""
        return _checksum(self.policy)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights on CPU (ZeRO-2 keeps whole parameters on every rank)."""
        return {k: v.detach().float().cpu().clone() for k, v in self.policy.state_dict().items()}

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: str, client_state: dict, keep_last: int = 2) -> str:
        """DeepSpeed checkpoint under directory/step_N; `latest.json` moves only once every rank is done.

        A crash mid-save leaves latest.json on the previous, complete checkpoint.
        """
        root, tag = Path(directory), f"step_{self.step:07d}"
        state = {**client_state, "step": self.step, "stage": self.stage, "seed": self.seed,
                 "sampling_updates": self.sampling_updates}
        self.engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        torch.save(rng, root / tag / f"rng_rank{self.rank}.pt")
        if self.sampling_policy is not None and self.rank == 0:  # rl: theta_old is state too (same on all ranks)
            torch.save(self.sampling_policy.state_dict(), root / tag / SAMPLING_POLICY_FILE)
        dist.barrier()
        if self.rank == 0:
            tmp = root / (LATEST_FILE + ".tmp")
            tmp.write_text(json.dumps({"tag": tag, "step": self.step}))
            os.replace(tmp, root / LATEST_FILE)
            tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
            for old in tags[: max(0, len(tags) - keep_last)]:
                shutil.rmtree(root / old, ignore_errors=True)
        dist.barrier()
        return tag

    def load_checkpoint(self, directory: str) -> dict:
        """Restore the newest complete checkpoint; returns its client state (step, data position...)."""
        root = Path(directory)
        tag = json.loads((root / LATEST_FILE).read_text())["tag"]
        _, client_state = self.engine.load_checkpoint(str(root), tag=tag)
        rng = torch.load(root / tag / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.step, self.stage, self.seed = client_state["step"], client_state["stage"], client_state["seed"]
        if self.sampling_policy is not None:
            self.sampling_policy.load_state_dict(torch.load(root / tag / SAMPLING_POLICY_FILE, weights_only=True))
            self.sampling_updates = client_state["sampling_updates"]
        return client_state

    def export(self, directory: str, sampling_policy: bool = False) -> str:
        """The trained policy (or, in the rl stage, theta_old: the policy the rollouts came from) in diffusers layout."""
        if self.rank == 0:
            (self.sampling_policy if sampling_policy else self.policy).save_pretrained(directory)
        dist.barrier()
        return directory

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _checksum(module: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in module.parameters()))


# The one place that says which training objectives exist: name -> (learner, v, x0, eps, x_t, t,
# ids, mask, inputs, tasks) -> (loss, stats).
OBJECTIVES = {
    "sft": Learner._sft_objective,
    "distill": Learner._distill_objective,
}
