"""What reward models and scorers take: edits to score and preference pairs to learn from.

Images are PIL images at their own sizes: the VLM judge and the OCR want pixels as a user would
see them, and the vision backbones letterbox them onto their own canvas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class EditSample:
    """One poster edit to score: what the policy was given and what it made."""

    prompt_id: str  # the manifest row id (samples of one prompt group share it)
    task: str  # one of posterrl.data.tasks.TASKS
    instruction: str
    inputs: list[Image.Image]  # the edit's input images, as the policy received them (1..max_inputs)
    output: Image.Image  # the edited poster at its output size
    meta: dict = field(default_factory=dict)  # the manifest row's meta: poster title, crop/mask boxes, ...
    # The row's target when it has one. Only the gold_oracle scorer reads it; every other scorer judges the
    # edit from what the policy was given.
    target: Image.Image | None = None



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
