"""FLUX.1 Kontext as a posterrl policy: the released transformer in latent space, trained through LoRA.

`KontextPolicy` puts `KontextEditModel` (posterrl/models/kontext.py: the pipeline's components and sampling
numbers) behind the `Policy` interface every stage uses (posterrl/policy.py), so sft, distill, rl and eval run
it as they run the tiny default. What differs from the pixel-space tiny policy:

- latents: a canvas of R x R px is (T, 64) packed VAE latents, T = (R / 16)^2. Training targets are VAE-encoded
  (`encode_images`, the distribution's mode, no gradients), samples are decoded only for rewards, evaluation
  and TensorBoard (`decode_latents`); the NFT update trains on the latents the sampler produced.
- conditioning: instructions through the checkpoint's own CLIP + T5 (frozen, cached per text), each of the N
  input canvases VAE-encoded as Kontext condition tokens with rotary index i + 1 (the pipeline takes one input
  image with index 1; more inputs continue the count, as the tiny policy does).
- the time grid: the pipeline's (sigmas linspace(1, 1/S, S), dynamically shifted by the scheduler config for
  the canvas' token count); `rollout.shift` does not apply.
- guidance: one transformer call per step at the distilled guidance scale `model.guidance` (the sampling
  policy is CFG-free, as DiffusionNFT trains it).
- weights: with `model.lora.rank > 0` peft adapters on `model.lora.target_modules`, the only parameters that
  train; `policy_state()` is then the adapter tensors alone (what sync moves, what exports hold). rank 0 trains
  the transformer in full and its state is the transformer's.

An export is a folder with posterrl_policy.json (kind, canvas, sampler, guidance, LoRA settings, the base
checkpoint's path) and either `pytorch_lora_weights.safetensors`, in the format
`FluxKontextPipeline.load_lora_weights(folder)` reads, or `transformer/` (full fine-tuning).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from posterrl.config import ModelConfig, RolloutConfig
from posterrl.files import replace_dir, staging_dir
from posterrl.flow import SamplerConfig
from posterrl.models.kontext import KontextEditModel, ReferenceLatents, latent_ids
from posterrl.policy import SPEC_FILE, PolicySpec, check_state_keys

TOKEN_PX = 16  # pixels per packed latent token side: an 8x VAE, 2 x 2 packing
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for in a folder
ADAPTER = "default"


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


class KontextPolicy(nn.Module):
    pixel_space = False

    def __init__(self, model: KontextEditModel, spec: PolicySpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.model.max_sequence_length = spec.max_text_length
        self.grid = spec.resolution // TOKEN_PX  # packed tokens per canvas side
        lora = spec.lora or {}
        if lora.get("rank", 0):
            # peft marks the adapters trainable and leaves the rest as it was; freeze the base explicitly.
            model.requires_grad_(False)
            model.transformer.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                                     target_modules=list(lora["target_modules"]),
                                                     init_lora_weights=True), adapter_name=ADAPTER)
            self.state_keys = [k for k in self.state_dict() if ".lora_" in k]
        else:
            model.requires_grad_(False)
            model.transformer.requires_grad_(True)
            self.state_keys = [k for k in self.state_dict() if k.startswith("model.transformer.")]

    # ------------------------------------------------------------------ building

    @classmethod
    def spec_from_config(cls, model: ModelConfig, rollout: RolloutConfig | None = None) -> PolicySpec:
        assert model.pretrained_path is not None, "validated: flux_kontext needs model.pretrained_path"
        lora = model.lora
        return PolicySpec(
            kind=model.kind,
            resolution=model.resolution,
            patch_size=TOKEN_PX,
            max_text_length=model.text_encoder.max_length,
            max_inputs=model.max_inputs,
            sampler=SamplerConfig.from_rollout(rollout) if rollout else SamplerConfig(),
            pretrained_path=str(Path(model.pretrained_path).resolve()),
            guidance=model.guidance,
            lora={"rank": lora.rank, "alpha": lora.alpha or lora.rank, "target_modules": list(lora.target_modules)}
            if lora.rank else None,
        )

    @classmethod
    def from_config(cls, model: ModelConfig, rollout: RolloutConfig | None = None) -> KontextPolicy:
        """The base checkpoint at model.pretrained_path with fresh adapters (B = 0: the policy is the base)."""
        spec = cls.spec_from_config(model, rollout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.seed)  # the adapters' A matrices
            policy = cls(KontextEditModel.from_pretrained(str(spec.pretrained_path)), spec)
        if model.gradient_checkpointing:
            policy.model.transformer.enable_gradient_checkpointing()
        return policy

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> KontextPolicy:
        directory = Path(directory)
        spec = PolicySpec.load(directory)
        base = spec.pretrained_path
        assert base is not None, f"{directory / SPEC_FILE}: a flux_kontext export names its base"
        model = KontextEditModel.from_pretrained(base)
        if spec.lora is None:
            model.transformer = FluxTransformer2DModel.from_pretrained(directory / "transformer")
        policy = cls(model, spec)
        if spec.lora is not None:
            saved = load_file(directory / LORA_FILE)
            state = {k.removeprefix("transformer."): v for k, v in saved.items()}
            result: Any = set_peft_model_state_dict(policy.model.transformer, state, adapter_name=ADAPTER)
            if result.unexpected_keys:
                raise ValueError(f"{directory / LORA_FILE}: tensors the adapters do not have: "
                                 f"{result.unexpected_keys[:3]}")
            lora_missing = [k for k in result.missing_keys if ".lora_" in k]
            if lora_missing:
                raise ValueError(f"{directory / LORA_FILE}: adapter tensors missing: {lora_missing[:3]}")
        return policy.eval()

    def train(self, mode: bool = True) -> KontextPolicy:
        """The frozen conditioning (text encoders, VAE) stays in eval mode: T5's dropout would otherwise make
        the cached prompt embeddings depend on the call that filled the cache."""
        super().train(mode)
        for part in (self.model.vae, self.model.text_encoder, self.model.text_encoder_2):
            part.eval()
        return self

    # ------------------------------------------------------------------ the Policy interface

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.grid * self.grid, 4 * self.model.latent_channels)

    def prepare(self, instructions: list[str], inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(text (B, L, D), pooled (B, P), ref_tokens (B, N*Tc, 64)), all without gradients."""
        prompt = self.model.encode_prompt(instructions)
        b, n = inputs.shape[:2]
        refs = self.model.encode_reference(inputs.flatten(0, 1)).tokens  # (B*N, Tc, 64)
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

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                ref_tokens: torch.Tensor) -> torch.Tensor:
        return self.velocity(x_t, t, self.condition(text, pooled, ref_tokens))

    def time_grid(self, sampler: SamplerConfig) -> torch.Tensor:
        sigmas, _ = self.model.time_grid(sampler.num_steps, self.grid * self.grid)
        return sigmas.float().cpu()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_reference(images).tokens  # (B, T, 64)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        size = self.spec.resolution
        return self.model.decode(latents, size, size)

    def policy_state(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        return {k: state[k] for k in self.state_keys}

    def load_policy_state(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        check_state_keys(state, self.state_keys, f"{self.spec.kind} policy state")
        self.load_state_dict(state, strict=False, assign=assign)

    # ------------------------------------------------------------------ disk

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(directory)
        if self.spec.lora is not None:
            layers = {k: v.detach().float().contiguous()
                      for k, v in get_peft_model_state_dict(self.model.transformer, adapter_name=ADAPTER).items()}
            FluxKontextPipeline.save_lora_weights(tmp, transformer_lora_layers=layers, safe_serialization=True)
        else:
            self.model.transformer.save_pretrained(tmp / "transformer")
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(self.spec), indent=2) + "\n")
        return replace_dir(tmp, directory)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

