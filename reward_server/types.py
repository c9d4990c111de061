"""What every scorer returns and the scorer protocol; the samples they score are in posterrl/models/samples.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from posterrl.models.samples import EditSample


def scorer_device() -> torch.device:
    """Where model scorers run: the GPU Ray gave the reward server (reward.gpus > 0 makes it cuda:0 there;
    with none Ray hides every GPU), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def scorer_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, as VLMs are served; float32 on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class ScoreBatch:
    """A scorer's answer for a batch of B samples."""

    scores: np.ndarray  # (B,) float64 in the scorer's score_range; NaN where a sample could not be scored
    details: list[dict]  # B dicts, scorer-specific (OCR text, digit probabilities, ...), JSON-serialisable


class Scorer(Protocol):
    """A reward: a pure function of a batch of edits, loaded once, called many times."""

    kind: str  # the config kind: bradley_terry, vlm_judge, preservation, ocr_title, gold_oracle
    score_range: tuple[float, float]  # closed range of finite scores (-inf/inf for unbounded)

    def score(self, samples: Sequence[EditSample]) -> ScoreBatch: ...
