"""Weight broadcast between learner rank 0 and the rollout workers, on a process group of its own.

The learner ranks already share torch.distributed's default group; the rollout workers are not in
it. This group is built from its own TCPStore (rank 0, the learner, hosts it), so creating it
touches neither the learner's group nor any global state: NCCL between GPUs (the path for GPU
clusters, as OpenRLHF and veRL sync vLLM engines), gloo between CPU processes (the same code, so it
is tested here). Weights travel as one flat buffer; with LoRA only the adapter tensors are
named, so only they travel.

No Ray: actors/ starts both ends of a broadcast together.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist


def open_store(host: str, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
    """The server side of a rendezvous: a TCPStore listening on `host` only (127.0.0.1 when every member is on
    this machine, else this node's IP), on a port the OS picks as it binds (`store.port`), so there is no
    window between finding a free port and binding it in which another process could take it."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class BroadcastGroup:
    """Rank 0 sends, ranks 1..world_size-1 receive. Every member must construct it (the store waits for all).

    Rank 0 passes the store it opened (open_store) and whose port it told the others; without one it hosts
    a store on master_addr:master_port itself."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str,
                 timeout_s: float = 300.0, store: dist.TCPStore | None = None):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight broadcast backend {backend!r}: expected 'gloo' (CPU) or 'nccl' (GPU)")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError("weight broadcast over NCCL needs a GPU in every member; use the object store on CPU")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        if store is None:
            store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout)
        self.store = store
        self.group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        else:
            # torch's stub makes options required; the binding defaults it (ProcessGroupNCCL.Options())
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size)  # type: ignore[call-arg]
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def broadcast(self, tensors: Sequence[torch.Tensor], wire_dtype: torch.dtype = torch.float32) -> int:
        """Rank 0: send `tensors`; other ranks: overwrite their `tensors` (same shapes and order) in place.

        Returns the bytes moved. Everything travels as one flat buffer of `wire_dtype` (one collective
        per sync, not one per parameter); each side casts from and to its own dtypes, so a bf16
        learner can feed fp32 rollout workers.
        """
        total = sum(t.numel() for t in tensors)
        if self.rank == 0:
            flat = torch.cat([t.detach().reshape(-1).to(self.device, wire_dtype) for t in tensors])
        else:
            flat = torch.empty(total, dtype=wire_dtype, device=self.device)
        # c10d's Backend binds broadcast(tensor, root); torch's stub for Backend leaves it out
        self.group.broadcast(flat, 0).wait()  # type: ignore[union-attr]
        if self.rank != 0:
            offset = 0
            with torch.no_grad():
                for tensor in tensors:
                    tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
                    offset += tensor.numel()
        return flat.numel() * flat.element_size()


def trainable_tensors(module: torch.nn.Module, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """The tensors a sync moves, in state-dict order: all of them, or only `names` (e.g. LoRA adapters)."""
    state = module.state_dict(keep_vars=True)
    keys = list(state) if names is None else [k for k in state if k in set(names)]
    return [state[k].data for k in keys]
