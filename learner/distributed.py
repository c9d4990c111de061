"""DeepSpeed on any machine: the import-time setup, the engine config and joining the process group.

Imported before anything else touches DeepSpeed, so its CPU accelerator and the disabled shm op are
in place when the first engine starts.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, so DeepSpeed does not probe and warn

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it starts
# (deepspeed/comm/torch.py, build_shm_op), used only by inference_all_reduce, which training never
# calls. The compile holds a lock file in the torch extensions folder: a process killed mid-compile
# leaves the lock behind and every later DeepSpeed start, in any venv, waits on it forever (seen on
# this project's machines). Marked incompatible, build_shm_op returns None and gloo does every
# collective; on GPU the op is not built anyway.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from posterrl.config import Config  # noqa: E402


def deepspeed_config(config: Config, batch_size: int, micro_batch_size: int) -> dict:
    """The DeepSpeed config of one training task: its global and per-rank batch, the shared learner settings."""
    lc, ds = config.learner, config.deepspeed
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": batch_size // (lc.num_ranks * micro_batch_size),
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {
            "stage": ds.zero_stage,
            **({"offload_optimizer": {"device": "cpu"}} if ds.offload_optimizer else {}),
        },
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,  # progress is ours; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def train_dtype(config: Config) -> torch.dtype:
    """The dtype DeepSpeed keeps the trained module in (frozen copies beside it must match)."""
    return torch.bfloat16 if config.deepspeed.precision == "bf16" else torch.float32


def warmup_lambda(warmup_steps: int):
    """Linear warm-up to the base learning rate, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def join_process_group(rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device,
                       store: dist.TCPStore | None = None) -> int:
    """Join the process group (gloo on CPU, NCCL on GPU) through the rendezvous store rank 0 opened
    (posterrl.weight_sync.open_store; rank 0 passes it, the others connect to master_addr:master_port), then
    let DeepSpeed adopt the group, so it never tries MPI discovery; returns this process's rank."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
                       "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if store is None:
            store = dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                                  timeout=timedelta(seconds=300))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank()
