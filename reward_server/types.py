"""What every scorer takes and returns, and the preference pairs a Bradley-Terry model learns from.

Images are PIL images at their own sizes: the VLM judge and the OCR want pixels as a user would
see them, and the vision backbones letterbox them onto their own canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image


def scorer_device() -> torch.device:
    """Where model scorers run: the GPU Ray gave the reward server (reward.gpus > 0 makes it cuda:0 there;
    with none Ray hides every GPU), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def scorer_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, as VLMs are served; float32 on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class EditSample:
    """One poster edit to score: what the policy was given and what it made."""

    prompt_id: str  # the manifest row id (samples of one prompt group share it)
    task: str  # one of posterrl.data.tasks.TASKS
    instruction: str
    inputs: list[Image.Image]  # the edit's input images, as the policy received them (1..max_inputs)
    output: Image.Image  # the edited poster at its output size
    meta: dict = field(default_factory=dict)  # the manifest row's meta: poster title, crop/mask boxes, ...


@dataclass
class ScoreBatch:
    """A scorer's answer for a batch of B samples."""

    scores: np.ndarray  # (B,) float64 in the scorer's score_range; NaN where a sample could not be scored
    details: list[dict]  # B dicts, scorer-specific (OCR text, digit probabilities, ...), JSON-serialisable


class Scorer(Protocol):
    """A reward: a pure function of a batch of edits, loaded once, called many times."""

    kind: str  # the config kind: bradley_terry, vlm_judge, preservation, ocr_title
    score_range: tuple[float, float]  # closed range of finite scores (-inf/inf for unbounded)

    def score(self, samples: Sequence[EditSample]) -> ScoreBatch: ...


@dataclass
class PreferencePair:
    """Two outputs for the same inputs and instruction; `chosen` is preferred unless `tie`."""

    pair_id: str
    task: str
    instruction: str
    inputs: list[Image.Image]
    chosen: Image.Image
    rejected: Image.Image
    tie: bool = False
    source: str = "manifest"  # policy (two samples of one group), negative (input as rejected), manifest (user)
    gold_margin: float | None = None  # true gold(chosen) - gold(rejected) for generated pairs; None for user pairs
