"""Weight broadcast between learner rank 0 and the rollout workers, on a process group of its own.

The learner ranks already share torch.distributed's default group; the rollout workers are not in
it. This group is built from its own TCPStore (rank 0, the learner, hosts it), so creating it
touches neither the learner's group nor any global state: NCCL between GPUs (the path for GPU
clusters, as OpenRLHF and veRL sync vLLM engines), gloo between CPU processes (the same code, so it
is tested here). Weights travel as one flat buffer; with LoRA only the adapter tensors are
named, so only they travel.

Every sync is verified: the receiving side reports the `fingerprint` of the tensors its policy holds after the
load, and the driver compares it with the sender's (`fingerprint_mismatch`), so a sync that bound nothing, left
a tensor stale or mixed up keys stops the run instead of sampling from weights nobody trained. Every
rollout.probe_every syncs, the policy's output on a fixed input (`probe_inputs`) is compared too: weights that
hold the right numbers but act differently (a module the sync bound that the forward does not use, an adapter
disabled) show there.

No Ray: actors/ starts both ends of a broadcast together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def open_store(host: str, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
    """The server side of a rendezvous: a TCPStore listening on `host` only (127.0.0.1 when every member is on
    this machine, else this node's IP), on a port the OS picks as it binds (`store.port`), so there is no
    window between finding a free port and binding it in which another process could take it."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


# Elements per broadcast buffer: 64 Mi (256 MiB in float32). A LoRA state fits in one; full weights go in pieces,
# so neither side holds a second copy of a whole 12B transformer in flight.
BUCKET_NUMEL = 64 * 2**20


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

    def broadcast(self, tensors: Sequence[torch.Tensor], wire_dtype: torch.dtype = torch.float32,
                  bucket_numel: int = BUCKET_NUMEL) -> int:
        """Rank 0: send `tensors`; other ranks: overwrite their `tensors` (same shapes and order) in place.

        Returns the bytes moved. Tensors travel in flat buffers of `wire_dtype` of at most `bucket_numel`
        elements (`buckets`): one collective for a LoRA state, a bounded buffer for a full 12B transformer, never
        one collective per parameter; each side casts from and to its own dtypes, so a bf16 learner can feed fp32
        rollout workers.
        """
        moved = 0
        for bucket in buckets([t.numel() for t in tensors], bucket_numel):
            members = [tensors[i] for i in bucket]
            if self.rank == 0:
                flat = torch.cat([t.detach().reshape(-1).to(self.device, wire_dtype) for t in members])
            else:
                flat = torch.empty(sum(t.numel() for t in members), dtype=wire_dtype, device=self.device)
            # c10d's Backend binds broadcast(tensor, root); torch's stub for Backend leaves it out
            self.group.broadcast(flat, 0).wait()  # type: ignore[union-attr]
            if self.rank != 0:
                offset = 0
                with torch.no_grad():
                    for tensor in members:
                        tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
                        offset += tensor.numel()
            moved += flat.numel() * flat.element_size()
        return moved


def buckets(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive tensor indices grouped so that each group holds at most `limit` elements; a tensor larger than
    the limit travels alone."""
    groups: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if not groups or total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += size
    return groups


def trainable_tensors(module: torch.nn.Module, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """The tensors a sync moves, in state-dict order: all of them, or only `names` (e.g. LoRA adapters)."""
    state = module.state_dict(keep_vars=True)
    keys = list(state) if names is None else [k for k in state if k in set(names)]
    return [state[k].data for k in keys]


# ---------------------------------------------------------------------------------------------------- verification

PROBE_SEED = 20261202  # the probe check's fixed input

Fingerprint = dict[str, tuple[float, float, float]]  # state key -> (sum, sum of |x|, position-weighted sum)


def fingerprint(state: Mapping[str, torch.Tensor | np.ndarray], as_dtype: torch.dtype | None = None) -> Fingerprint:
    """Per tensor, in float64: its sum, the sum of its magnitudes, and a sum weighted by position (weights 1..97
    repeating), three numbers that change when a tensor is stale, zeroed, transposed, moved to another key or
    half-written; computed where the tensor lives (GPU or CPU), so no copy travels. `as_dtype`: of the tensors
    rounded to that dtype first, as a receiver that holds them in it (bf16 rollouts) has them."""
    out = {}
    for key, value in state.items():
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value.detach()
        if as_dtype is not None:
            tensor = tensor.to(as_dtype)
        flat = tensor.reshape(-1).double()
        position = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64) % 97 + 1
        out[key] = (float(flat.sum()), float(flat.abs().sum()), float((flat * position).sum()))
    return out


def fingerprint_mismatch(expected: Fingerprint, got: Fingerprint, rel_tol: float = 1e-6) -> str | None:
    """None when `got` holds the same tensors as `expected` (sums within rel_tol of the magnitude: sums in another
    order on another device differ in the last bits), else what differs, naming up to three keys."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        return f"{len(missing)} tensors missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
    # every figure is bounded by 97 x the magnitude sum: that scale sets the tolerance
    differ = [key for key, figures in expected.items()
              if any(abs(g - e) > rel_tol * 97 * figures[1] + 1e-12 for g, e in zip(got[key], figures, strict=True))]
    if differ:
        shown = "; ".join(f"{k}: sum {got[k][0]:.6g} (expected {expected[k][0]:.6g}), |x| sum {got[k][1]:.6g} "
                          f"(expected {expected[k][1]:.6g})" for k in differ[:3])
        return f"{len(differ)} of {len(expected)} tensors differ: {shown}"
    return None


PROBE_INSTRUCTION = "Probe the synced weights."


def probe_inputs(policy: Any) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """A fixed input for the probe check: (x_t (1, *latent_shape), t (1,), instructions, inputs (1, 1, 3, R, R)),
    the same on every process (seeded generators), on the policy's device and dtype."""
    weight = next(policy.parameters())
    generator = torch.Generator().manual_seed(PROBE_SEED)
    side = policy.spec.resolution
    inputs = torch.rand((1, 1, 3, side, side), generator=generator) * 2 - 1  # (1, 1, 3, R, R)
    x_t = torch.randn((1, *policy.latent_shape), generator=generator)  # (1, *latent_shape)
    return (x_t.to(weight.device, weight.dtype), torch.full((1,), 0.5, device=weight.device, dtype=weight.dtype),
            [PROBE_INSTRUCTION], inputs.to(weight.device, weight.dtype))


def probe_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    """Relative L2 distance of a probe velocity from the expected one."""
    expected, got = expected.double().cpu(), got.double().cpu()
    return float((got - expected).norm() / expected.norm().clamp(min=1e-12))


def probe_mismatch(expected: torch.Tensor, got: torch.Tensor, rel_tol: float) -> str | None:
    """None when two probe velocities agree within rel_tol in relative L2 norm, else the two norms and the error."""
    error = probe_error(expected, got)
    if error <= rel_tol:
        return None
    return f"probe velocity differs by {error:.3g} (relative L2; tolerance {rel_tol:g}): |v| {float(got.norm()):.6g} " \
           f"on the actor, {float(expected.norm()):.6g} from learner rank 0's theta_old"
