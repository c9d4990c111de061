"""FLUX.1 Kontext as a posterrl policy: the released transformer in latent space, trained through LoRA
(posterrl/models/pipeline_policy.py has what the released pipelines share: latents, LoRA, exports).

Kontext's own part is the conditioning: instructions through the checkpoint's own CLIP + T5 (frozen, cached per
text, at most model.text_encoder.max_length T5 tokens), each of the N input canvases VAE-encoded as Kontext
condition tokens with rotary index i + 1 (the pipeline takes one input image with index 1; more inputs continue
the count, as the tiny policy does), and one transformer call per step at the distilled guidance scale
`model.guidance` (the sampling policy is CFG-free, as DiffusionNFT trains it). Exports load with
`FluxKontextPipeline.load_lora_weights(folder)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel

from posterrl.models.kontext import KontextEditModel, ReferenceLatents, latent_ids
from posterrl.models.pipeline_policy import PipelinePolicy
from posterrl.policy import PolicySpec


@dataclass
class KontextCondition:
    """Encoded condition of B samples with N input canvases each (no gradients: the encoders are frozen).

    text:       (B, L, D) T5 hidden states
    pooled:     (B, P)    CLIP pooled output
    ref_tokens: (B, N*Tc, 64) packed VAE latents of the inputs, Tc tokens each
    ref_ids:    (N*Tc, 3) rotary ids [input index (1..N), row, col]
    """

    text: torch.Tensor
    pooled: torch.Tensor
    ref_tokens: torch.Tensor
    ref_ids: torch.Tensor

    def repeat_interleave(self, k: int) -> KontextCondition:
        return KontextCondition(self.text.repeat_interleave(k, 0), self.pooled.repeat_interleave(k, 0),
                                self.ref_tokens.repeat_interleave(k, 0), self.ref_ids)


class KontextPolicy(PipelinePolicy):
    MODEL = KontextEditModel
    PIPELINE = FluxKontextPipeline
    TRANSFORMER = FluxTransformer2DModel
    FROZEN = ("vae", "text_encoder", "text_encoder_2")

    def __init__(self, model: KontextEditModel, spec: PolicySpec):
        super().__init__(model, spec)
        self.model.max_sequence_length = spec.max_text_length

    def prepare(self, instructions: list[str], inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(text (B, L, D), pooled (B, P), ref_tokens (B, N*Tc, 64)), all without gradients."""
        prompt = self.model.encode_prompt(instructions)
        b, n = inputs.shape[:2]
        refs = self.encode_references(inputs.flatten(0, 1))  # (B*N, Tc, 64), each image encoded once
        return prompt.text, prompt.pooled, refs.reshape(b, n * refs.shape[1], refs.shape[2])

    def condition(self, *prepared: torch.Tensor) -> KontextCondition:
        text, pooled, ref_tokens = prepared
        n = ref_tokens.shape[1] // (self.grid * self.grid)
        ids = torch.cat([latent_ids(self.grid, self.grid, i + 1, ref_tokens.device, text.dtype)
                         for i in range(n)])  # (N*Tc, 3)
        return KontextCondition(text, pooled, ref_tokens, ids)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: KontextCondition) -> torch.Tensor:
        """x_t (B, T, 64), t (B,) in [0, 1] -> v = eps - x0, (B, T, 64)."""
        size = self.spec.resolution
        return self.model.velocity(x_t, t, cond.text, cond.pooled, ReferenceLatents(cond.ref_tokens, cond.ref_ids),
                                   guidance=self.spec.guidance or 1.0, image_size=(size, size))
