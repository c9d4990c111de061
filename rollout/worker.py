"""The rollout role: holds a copy of the sampling policy and turns prompts into K samples each.

A plain class; actors/ wraps it with `ray.remote` at spawn time, tests and `posterrl sample` use
it in-process.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from posterrl.batch import bucket_by_num_inputs, collate
from posterrl.config import ModelConfig
from posterrl.data.manifest import ManifestRow
from posterrl.experience import output_images
from posterrl.flow import SamplerConfig
from posterrl.policies import SAMPLING_DTYPES, build_policy, load_policy
from posterrl.policy import quiet_model_libraries
from posterrl.weight_sync import BroadcastGroup, Fingerprint, fingerprint, probe_inputs
from rollout.sampler import prompt_seed, sample_groups

UNLOADED = -1  # the policy_version of a worker whose weights have not arrived


@dataclass
class WeightLoad:
    """What a worker reports after taking new weights: how long it took and what it holds now, which the driver
    checks against the sender's fingerprint (posterrl/weight_sync.py)."""

    seconds: float
    version: int
    fingerprint: Fingerprint


@dataclass
class RolloutGroup:
    """The K samples of one prompt.

    samples:        (K, 3, R, R) canvases in [-1, 1]
    latents:        (K, *latent_shape) the sampler's output, the clean x0 the learner trains on; None for a
                    pixel-space policy, whose samples are its x0
    inputs:         (N, 3, R, R) the input canvases the samples were conditioned on, in [-1, 1]
    output_aspect:  (w, h) the outputs are cropped to
    policy_version: version of the weights that sampled them
    frame_input:    the first input at its own resolution when the outputs add its detail (model.input_detail),
                    else None
    """

    prompt_id: str
    task: str
    instruction: str
    samples: torch.Tensor
    inputs: torch.Tensor
    output_aspect: tuple[float, float]
    seed: int
    policy_version: int
    latents: torch.Tensor | None = None
    frame_input: Image.Image | None = None

    def output_images(self, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """The K samples as images at the output aspect, optionally resized to size (w, h)."""
        return output_images(self, size)


class RolloutWorker:
    def __init__(self, model: dict | None = None, checkpoint: str | None = None, num_threads: int | None = None,
                 device: str = "cpu", dtype: str = "fp32"):
        """Build the policy from a model config (weights arrive with `load_weights`) or load an exported one, on
        `device` ("cuda" in an actor Ray gave a GPU: CUDA_VISIBLE_DEVICES names it as device 0), sampling in
        `dtype` (rollout.dtype: fp32 or bf16; weights are rounded to it as they load)."""
        quiet_model_libraries()
        if (model is None) == (checkpoint is None):
            raise ValueError("RolloutWorker needs exactly one of model (a config dict) or checkpoint (a directory)")
        if num_threads:
            torch.set_num_threads(num_threads)
        if checkpoint is not None:
            self.policy = load_policy(checkpoint)
        else:
            self.policy = build_policy(ModelConfig.model_validate(model))
        self.device = torch.device(device)
        self.dtype = SAMPLING_DTYPES[dtype]
        self.policy.to(self.device, self.dtype).eval().requires_grad_(False)
        self.resident = True  # the policy is on self.device (False after offload, until the next sampling)
        # -1: built from a config, no weights loaded yet (a version is never negative, so no chunk matches it)
        self.policy_version = 0 if checkpoint is not None else UNLOADED
        self.weight_group: BroadcastGroup | None = None  # rollout.weight_sync=broadcast
        self._shared_weights: dict[str, np.ndarray] | None = None  # object-store arrays the policy uses in place

    def load_weights(self, state_dict: Mapping[str, torch.Tensor | np.ndarray], version: int) -> WeightLoad:
        """New weights; returns the seconds spent and the fingerprint of what the policy holds now.

        Numpy arrays (what the object store hands out) are used in place, without a copy: they are
        read-only views of the shared object, and sampling only reads weights, so M actors on a node
        share one copy and loading costs the same for any M. The arrays stay referenced until the next
        load. Tensors are cloned. Either way the parameters are replaced, never written into, since the
        current ones may be read-only.
        """
        began = time.perf_counter()
        self._make_resident()  # weights land where the policy samples
        arrays = {k: v for k, v in state_dict.items() if isinstance(v, np.ndarray)}
        tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        if len(arrays) == len(state_dict) and self.device.type == "cpu" and self.dtype == torch.float32:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                weights = {k: torch.from_numpy(v) for k, v in arrays.items()}
            self._shared_weights = arrays
        elif len(arrays) == len(state_dict):  # onto the GPU or into bf16: a copy either way
            weights = {k: torch.from_numpy(v.copy()).to(self.device, self.dtype) for k, v in arrays.items()}
            self._shared_weights = None
        elif len(tensors) == len(state_dict):
            weights = {k: v.detach().to(self.device, self.dtype, copy=True) for k, v in tensors.items()}
            self._shared_weights = None
        else:
            raise TypeError("load_weights: expected every value to be a numpy array, or every value a tensor")
        self.policy.load_policy_state(weights, assign=True)
        self.policy_version = version
        return self._report(began)

    def join_weight_broadcast(self, master_addr: str, master_port: int, rank: int, world_size: int,
                              backend: str) -> None:
        """Join the learner's weight broadcast group as receiver `rank` (1..M)."""
        self.weight_group = BroadcastGroup(master_addr, master_port, rank, world_size, backend)

    def receive_weights(self, version: int) -> WeightLoad:
        """Take the weights learner rank 0 broadcasts now (every member calls at once); returns what load_weights
        returns."""
        if self.weight_group is None:
            raise RuntimeError("receive_weights before join_weight_broadcast: this worker is in no broadcast group")
        began = time.perf_counter()
        self._make_resident()
        if self._shared_weights is not None:  # read-only object-store views: receive into writable copies
            self.load_weights(self.policy.policy_state(), self.policy_version)
        self.weight_group.broadcast(list(self.policy.policy_state().values()))
        self.policy_version = version
        return self._report(began)

    def _report(self, began: float) -> WeightLoad:
        # the fingerprint is read back from the policy's own tensors, not from what arrived: it shows what bound
        return WeightLoad(time.perf_counter() - began, self.policy_version, fingerprint(self.policy.policy_state()))

    @torch.no_grad()
    def probe(self) -> torch.Tensor:
        """The policy's velocity on the fixed probe input (posterrl.weight_sync.probe_inputs), on the CPU."""
        self._make_resident()
        x_t, t, instructions, inputs = probe_inputs(self.policy)
        cond = self.policy.condition(*self.policy.prepare(instructions, inputs))
        return self.policy.velocity(x_t, t, cond).float().cpu()

    def offload(self) -> None:
        """Free the GPU until the next sampling or weight load (cluster.placement=colocated: the learner trains on
        it meanwhile). Nothing to do on the CPU."""
        if self.device.type != "cpu" and self.resident:
            self.policy.to("cpu")
            self.resident = False
            torch.cuda.empty_cache()

    def _make_resident(self) -> None:
        if not self.resident:
            self.policy.to(self.device, self.dtype)
            self.resident = True

    def sample(self, rows: Sequence[ManifestRow], group_size: int, base_seed: int, sampler: SamplerConfig,
               max_batch: int = 16) -> list[RolloutGroup]:
        """K = group_size samples for each row, in the order of `rows`.

        Noise depends only on (base_seed, row id), so the same prompt gives the same samples in
        any batch, on any actor.
        """
        self._make_resident()
        groups: dict[str, RolloutGroup] = {}
        per_call = max(1, max_batch // group_size)
        for bucket in bucket_by_num_inputs(rows, per_call):
            batch = collate(bucket, self.policy.spec.resolution, with_targets=False,
                            stretch_rescaled=self.policy.spec.stretch_rescaled_input)
            seeds = [prompt_seed(base_seed, i) for i in batch.ids]
            out = sample_groups(self.policy, batch.instructions, batch.inputs, seeds, group_size, sampler)
            for g, row_id in enumerate(batch.ids):
                groups[row_id] = RolloutGroup(
                    prompt_id=row_id,
                    task=batch.tasks[g],
                    instruction=batch.instructions[g],
                    samples=out.images[g],
                    inputs=batch.inputs[g],
                    output_aspect=batch.output_aspects[g],
                    seed=seeds[g],
                    policy_version=self.policy_version,
                    latents=None if out.latents is None else out.latents[g],
                    frame_input=batch.frame_inputs[g] if self.policy.spec.input_detail else None,
                )
        return [groups[r.id] for r in rows]
