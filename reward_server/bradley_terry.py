"""A trained Bradley-Terry reward model (posterrl/models/reward_model.py) served as a scorer."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from posterrl.batch import on_device
from posterrl.models.reward_model import ConvRewardModel, load_reward_model
from posterrl.models.samples import EditSample
from reward_server.types import ScoreBatch, scorer_device, scorer_dtype


def _gil_free(model: ConvRewardModel) -> torch.jit.ScriptModule:
    """The conv model traced and frozen for serving. A TorchScript call holds the GIL only on entry and exit,
    whereas eager mode takes it back after every op: in the reward server, whose event loop is busy
    receiving requests, each of those ~60 takes can wait out a GIL switch interval (docs/benchmarks.md).
    The absent-input indexing in forward traces as data-dependent ops, so any batch size and mix of
    input counts runs through one trace (tests compare it with eager). torch.jit is deprecated but works
    in the pinned torch (2.13); its deprecation and tracer warnings are silenced here for that reason."""
    m, device = model.spec["max_inputs"], next(model.parameters()).device
    example = {"output": torch.zeros(2, 3, model.size, model.size, device=device),
               "inputs": torch.zeros(2, m, 3, model.size, model.size, device=device),
               "input_mask": torch.tensor([[1.0] + [0.0] * (m - 1), [1.0] * m], device=device),
               "task": torch.tensor([0, 1], device=device)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.freeze(torch.jit.trace(model, example_kwarg_inputs=example, check_trace=False))


class BradleyTerryScorer:
    """A trained reward model as a scorer: unbounded scalar rewards (higher is better)."""

    kind = "bradley_terry"
    score_range = (-float("inf"), float("inf"))

    def __init__(self, directory: str | Path, batch_size: int = 64, device: torch.device | None = None):
        self.device = device or scorer_device()
        model = load_reward_model(directory).eval()
        conv = isinstance(model, ConvRewardModel)
        # A VLM backbone is served in bf16 on GPU; the small conv model stays float32 everywhere.
        self.dtype = torch.float32 if conv else scorer_dtype(self.device)
        self.model = model.to(self.device, self.dtype)
        self.batch_size = batch_size
        self.forward = _gil_free(self.model) if isinstance(self.model, ConvRewardModel) else self.model

    @torch.no_grad()
    def score(self, samples: Sequence[EditSample]) -> ScoreBatch:
        scores = []
        for start in range(0, len(samples), self.batch_size):
            prepared = on_device(self.model.prepare(samples[start : start + self.batch_size]), self.device, self.dtype)
            scores.append(self.forward(**prepared).double().cpu().numpy())
        return ScoreBatch(np.concatenate(scores) if scores else np.zeros(0), [{} for _ in samples])
