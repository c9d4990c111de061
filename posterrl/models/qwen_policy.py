"""Qwen-Image-Edit as a posterrl policy: the released MMDiT in latent space, trained through LoRA
(posterrl/models/pipeline_policy.py has what the released pipelines share: latents, LoRA, exports).

Qwen's own part is the conditioning:
- the instruction goes through Qwen2.5-VL with the first input canvas, in the pipeline's edit template (frozen,
  cached per instruction and image); the released pipeline takes one condition image, so later inputs reach the
  transformer only as condition tokens;
- every input canvas is VAE-encoded at the canvas size (`QwenEditModel(condition_size=(R, R))`; the pipeline
  scales its condition to about 1 Mpx, which posterrl's small canvases do not need: see qwen_edit.py) and the N
  inputs are given to the transformer as one N R x R tall condition image (img_shapes (1, N*g, g)), so each keeps
  its own rows in the rotary positions;
- one transformer call per step on the instruction, no negative prompt: the CFG-free sampling policy DiffusionNFT
  trains (`model.guidance` does not apply: Qwen-Image-Edit is not guidance-distilled).
Exports load with `QwenImageEditPipeline.load_lora_weights(folder)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImageTransformer2DModel
from PIL import Image

from posterrl.models.pipeline_policy import PipelinePolicy
from posterrl.models.qwen_edit import PromptEmbeds, QwenEditModel, ReferenceLatents
from posterrl.policy import PolicySpec


@dataclass
class QwenCondition:
    """Encoded condition of B samples with N input canvases each (no gradients: the encoders are frozen).

    text:       (B, L, D) Qwen2.5-VL hidden states of the instruction with the first input
    mask:       (B, L) 1 for a token, 0 for padding
    ref_tokens: (B, N*Tc, 64) packed VAE latents of the inputs, Tc tokens each, as one tall image
    """

    text: torch.Tensor
    mask: torch.Tensor
    ref_tokens: torch.Tensor

    def repeat_interleave(self, k: int) -> QwenCondition:
        return QwenCondition(self.text.repeat_interleave(k, 0), self.mask.repeat_interleave(k, 0),
                             self.ref_tokens.repeat_interleave(k, 0))


def canvas_image(canvas: torch.Tensor) -> Image.Image:
    """(3, R, R) in [-1, 1] -> the PIL image Qwen2.5-VL's processor reads."""
    array = ((canvas.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()))


class QwenEditPolicy(PipelinePolicy):
    MODEL = QwenEditModel
    PIPELINE = QwenImageEditPipeline
    TRANSFORMER = QwenImageTransformer2DModel
    FROZEN = ("vae", "text_encoder")

    @classmethod
    def load_model(cls, spec: PolicySpec) -> Any:
        side = spec.resolution
        return QwenEditModel.from_pretrained(str(spec.pretrained_path), condition_size=(side, side))

    def prepare(self, instructions: list[str], inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(text (B, L, D), mask (B, L), ref_tokens (B, N*Tc, 64)), all without gradients."""
        prompt = self.model.encode_prompt(instructions, [canvas_image(sample[0]) for sample in inputs])
        b, n = inputs.shape[:2]
        refs = self.encode_references(inputs.flatten(0, 1))  # (B*N, Tc, 64), each image encoded once
        return prompt.text, prompt.mask, refs.reshape(b, n * refs.shape[1], refs.shape[2])

    def condition(self, *prepared: torch.Tensor) -> QwenCondition:
        return QwenCondition(*prepared)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: QwenCondition) -> torch.Tensor:
        """x_t (B, T, 64), t (B,) in [0, 1] -> v = eps - x0, (B, T, 64)."""
        n = cond.ref_tokens.shape[1] // (self.grid * self.grid)
        size = self.spec.resolution
        return self.model.velocity(x_t, t, PromptEmbeds(cond.text, cond.mask),
                                   ReferenceLatents(cond.ref_tokens, (n * self.grid, self.grid)),
                                   image_size=(size, size))
