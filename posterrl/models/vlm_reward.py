"""The VLM backbone of the Bradley-Terry reward model for real runs: Qwen2-VL / Qwen2.5-VL + MLP head.

The chat (input images, output image, task and instruction) goes through the VLM; the final hidden
state of the last token (left padding puts it at position -1 for every row) feeds a scalar head.
With lora_rank > 0 the backbone is frozen and low-rank adapters on the language model's attention
projections train with the head (LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from posterrl.models.samples import EditSample
from posterrl.models.tiny_vlm import encode_chat

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x, with A random and B zero, so training starts from the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = (alpha or rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale  # (..., out)


def add_lora(module: nn.Module, rank: int) -> int:
    """Wrap every attention projection of the language model in place; returns how many were wrapped."""
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if name in LORA_TARGETS and isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, LoRALinear(child, rank))
    return len(targets)


class VlmRewardModel(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.spec = dict(spec)
        path = spec["vlm_path"]
        self.backbone = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).model
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        hidden = self.backbone.config.text_config.hidden_size
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        if spec.get("lora_rank", 0) > 0:
            self.backbone.requires_grad_(False)
            if add_lora(self.backbone.language_model, spec["lora_rank"]) == 0:
                raise ValueError(f"reward model {path}: no attention projections {LORA_TARGETS} to put LoRA on")

    def prepare(self, samples: Sequence[EditSample]) -> dict[str, torch.Tensor]:
        chats, images = [], []
        for s in samples:
            content = [{"type": "text", "text": "Input:"}, *({"type": "image"} for _ in s.inputs),
                       {"type": "text", "text": "Output:"}, {"type": "image"},
                       {"type": "text", "text": f"Task: {s.task}. Instruction: {s.instruction}"}]
            chats.append([{"role": "user", "content": content}])
            images.append([*s.inputs, s.output])
        return encode_chat(self.tokenizer, self.image_processor, chats, images)

    def forward(self, **prepared: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(**prepared).last_hidden_state  # (B, T, H)
        return self.head(hidden[:, -1]).squeeze(-1)  # (B,) last real token: rows are left-padded
