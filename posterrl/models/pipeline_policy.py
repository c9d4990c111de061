"""What the released pipelines' policies share (FLUX.1 Kontext, Qwen-Image-Edit): a transformer trained through
LoRA (or in full) beside frozen conditioning, in latent space, exported in the format the diffusers pipeline's
`load_lora_weights` reads. A kind's own module (posterrl/models/kontext_policy.py, qwen_policy.py) adds its
conditioning: `prepare`, `condition`, `velocity`.

- latents: a canvas of R x R px is (T, 64) packed VAE latents, T = (R / 16)^2 (an 8x VAE, 2 x 2 packing);
  `encode_images` (the VAE's mode, no gradients) makes training targets, `decode_latents` makes images for
  rewards, evaluation and TensorBoard.
- the time grid: the pipeline's own for the canvas' token count (the scheduler config's shift; rollout.shift does
  not apply).
- weights: with `model.lora.rank > 0` peft adapters on `model.lora.target_modules`, the only trained parameters;
  `policy_state()` is then the adapter tensors alone (what sync moves, what exports hold). rank 0 trains the
  transformer in full and its state is the transformer's.
- an export is posterrl_policy.json (kind, canvas, sampler, LoRA settings, the base checkpoint's path) and either
  `pytorch_lora_weights.safetensors` or `transformer/` (full fine-tuning).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from posterrl.config import ModelConfig, RolloutConfig
from posterrl.files import replace_dir, staging_dir
from posterrl.flow import SamplerConfig
from posterrl.policy import SPEC_FILE, PolicySpec, check_state_keys

TOKEN_PX = 16  # pixels per packed latent token side: an 8x VAE, 2 x 2 packing
# Reference latents kept per policy (on the CPU): an epoch's prompts and more. At 1024 px a FLUX.1 Kontext
# reference is 4096 x 64 values (512 KiB in bf16), so the cache holds at most about 0.5 GiB.
REFERENCE_CACHE_SIZE = 1024
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for in a folder
ADAPTER = "default"


class PipelinePolicy(nn.Module, ABC):
    """A released pipeline's model (`model`: transformer, vae, frozen encoders, `time_grid`, `encode_reference`,
    `decode`) as a trainable posterrl policy. Subclasses name their classes and add the conditioning."""

    pixel_space = False
    cached_latents = True
    MODEL: ClassVar[Any]  # the posterrl model class: from_pretrained(DIR) of the pipeline folder
    PIPELINE: ClassVar[Any]  # the diffusers pipeline class: its save_lora_weights writes the export
    TRANSFORMER: ClassVar[Any]  # the transformer class (full fine-tuning exports)
    FROZEN: ClassVar[tuple[str, ...]]  # the model's conditioning parts, kept in eval mode while training

    def __init__(self, model: Any, spec: PolicySpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.grid = spec.resolution // TOKEN_PX  # packed tokens per canvas side
        model.requires_grad_(False)
        self._reference_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # image digest -> (Tc, 64), CPU
        self.references_encoded = 0  # images this policy VAE-encoded (the rest came from the cache)
        if spec.lora is not None:
            # peft marks the adapters trainable; the base was frozen above
            model.transformer.add_adapter(LoraConfig(r=spec.lora["rank"], lora_alpha=spec.lora["alpha"],
                                                     target_modules=list(spec.lora["target_modules"]),
                                                     init_lora_weights=True), adapter_name=ADAPTER)
            self.state_keys = [k for k in self.state_dict() if ".lora_" in k]
        else:
            model.transformer.requires_grad_(True)
            self.state_keys = [k for k in self.state_dict() if k.startswith("model.transformer.")]

    # ------------------------------------------------------------------ building

    @classmethod
    def spec_from_config(cls, model: ModelConfig, rollout: RolloutConfig | None = None) -> PolicySpec:
        assert model.pretrained_path is not None, f"validated: {model.kind} needs model.pretrained_path"
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
            stretch_rescaled_input=model.stretch_rescaled_input,
            lora={"rank": lora.rank, "alpha": lora.alpha or lora.rank, "target_modules": list(lora.target_modules)}
            if lora.rank else None,
        )

    @classmethod
    def load_model(cls, spec: PolicySpec) -> Any:
        """The base checkpoint the spec names, as the kind's model class."""
        return cls.MODEL.from_pretrained(str(spec.pretrained_path))

    @classmethod
    def from_config(cls, model: ModelConfig, rollout: RolloutConfig | None = None) -> PipelinePolicy:
        """The base checkpoint at model.pretrained_path with fresh adapters (B = 0: the policy is the base)."""
        spec = cls.spec_from_config(model, rollout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.seed)  # the adapters' A matrices
            policy = cls(cls.load_model(spec), spec)
        if model.gradient_checkpointing:
            policy.model.transformer.enable_gradient_checkpointing()
        return policy

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PipelinePolicy:
        directory = Path(directory)
        spec = PolicySpec.load(directory)
        assert spec.pretrained_path is not None, f"{directory / SPEC_FILE}: a {spec.kind} export names its base"
        model = cls.load_model(spec)
        if spec.lora is None:
            model.transformer = cls.TRANSFORMER.from_pretrained(directory / "transformer")
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

    def train(self, mode: bool = True) -> PipelinePolicy:
        """The frozen conditioning stays in eval mode: dropout in a text encoder would otherwise make the cached
        prompt embeddings depend on the call that filled the cache."""
        super().train(mode)
        for name in self.FROZEN:
            getattr(self.model, name).eval()
        return self

    def encode_references(self, images: torch.Tensor) -> torch.Tensor:
        """Condition images (M, 3, R, R) in [-1, 1] -> their packed VAE latents (M, Tc, 64), no gradients.

        Each image is VAE-encoded once and kept (least recently used dropped first, REFERENCE_CACHE_SIZE at most)
        under a digest of its pixels, so the K samples of a group, every epoch's visit of a prompt and every
        forward of a training step (theta, theta_old, the experts) reuse it, in every stage and in the rollouts.
        Images are encoded one at a time, so a latent does not depend on the batch that first asked for it."""
        pixels = images.detach().float().cpu().contiguous()
        dtype = self.model.dtype  # latents of a bf16 VAE are other numbers than a float32 one's
        keys = [f"{hashlib.blake2b(image.numpy().tobytes(), digest_size=16).hexdigest()}|{dtype}" for image in pixels]
        with torch.no_grad():
            for key, image in zip(keys, pixels, strict=True):
                if key in self._reference_cache:
                    self._reference_cache.move_to_end(key)
                    continue
                self._reference_cache[key] = self.model.encode_reference(image[None]).tokens[0].cpu()
                self.references_encoded += 1
                while len(self._reference_cache) > REFERENCE_CACHE_SIZE:
                    self._reference_cache.popitem(last=False)
            return torch.stack([self._reference_cache[key] for key in keys]).to(self.model.device, dtype)

    def keep_frozen_out_of_module(self, device: torch.device, dtype: torch.dtype) -> None:
        """Take the frozen conditioning (FROZEN: text encoders, VAE) out of the module tree, in `dtype` on
        `device`, so that a ZeRO-3 engine partitions the transformer only: as diffusers' training scripts hand
        DeepSpeed the transformer alone. The encoders read their own weights outside module calls (CLIP's
        position-embedding count is a weight's shape), which a partitioned parameter does not have, and their
        work (prompt embeddings, VAE latents) is cached per sample anyway. They stay reachable as attributes."""
        for name in self.FROZEN:
            component = self.model._modules.pop(name).to(device, dtype)
            object.__setattr__(self.model, name, component)  # a plain attribute: not in parameters() or hooks

    # ------------------------------------------------------------------ the Policy interface

    @abstractmethod
    def prepare(self, instructions: list[str], inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen conditioning of B samples (instructions, input canvases (B, N, 3, R, R)), no gradients."""

    @abstractmethod
    def condition(self, *prepared: torch.Tensor) -> Any:
        """`prepare`'s tensors as the condition `velocity` reads (with repeat_interleave for prompt groups)."""

    @abstractmethod
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """x_t (B, T, 64), t (B,) in [0, 1] -> v = eps - x0, (B, T, 64)."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *prepared: torch.Tensor) -> torch.Tensor:
        return self.velocity(x_t, t, self.condition(*prepared))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.grid * self.grid, 4 * self.model.latent_channels)

    def time_grid(self, sampler: SamplerConfig) -> torch.Tensor:
        sigmas, _ = self.model.time_grid(sampler.num_steps, self.grid * self.grid)
        return sigmas.float().cpu()

    def encode_images(self, images: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.encode_reference(images).tokens  # (B, T, 64)

    def decode_latents(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        size = self.spec.resolution
        return self.model.decode(latents, size, size)

    def loss_weight(self, t: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)  # (B,) the released transformers predict v

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
            self.PIPELINE.save_lora_weights(tmp, transformer_lora_layers=layers, safe_serialization=True)
        else:
            self.model.transformer.save_pretrained(tmp / "transformer")
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(self.spec), indent=2) + "\n")
        return replace_dir(tmp, directory)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
