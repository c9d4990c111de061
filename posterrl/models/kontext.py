"""FLUX.1 Kontext [dev] as posterrl sees it: the released components, posterrl's own sampling loop.

`KontextEditModel.from_pretrained(DIR)` loads a FluxKontextPipeline folder (a `posterrl model make-tiny
--kind flux_kontext` folder, or a downloaded black-forest-labs/FLUX.1-Kontext-dev: the same layout) as its
parts: transformer, VAE, both text encoders and tokenizers, and the scheduler's config. It splits what
`FluxKontextPipeline.__call__` does into the pieces the rl stages need:

    encode_prompt(texts)       -> PromptEmbeds      CLIP pooled + T5 hidden states, cached per text
    encode_reference(images)   -> ReferenceLatents  VAE-encoded, 2 x 2 packed condition tokens and their ids
    velocity(latents, t, ...)  -> one transformer call on [noisy ; condition] tokens, the noisy part's output
    sample(...)                -> the flow-matching Euler loop, written here, and the decoded images
    decode(latents)            -> images

and reproduces the pipeline's numbers: the same time grid (sigmas linspace(1, 1/S, S), shifted with mu from the
image's token count through the scheduler's own `set_timesteps`), the same seeded start noise (diffusers'
`randn_tensor` of the unpacked latent shape, then packed), the same transformer inputs and the same Euler update
(in float32, as `FlowMatchEulerDiscreteScheduler.step`). tests/posterrl/test_kontext.py holds it to the pipeline.

Conventions (the pipeline's, kept so that outputs compare):
- packed latents: (B, T, 64), T = (H / 16) * (W / 16) tokens of 2 x 2 x 16 latent channels, row-major;
- time: the transformer takes t = timestep / 1000 in [0, 1], with x_t = (1 - t) x0 + t eps and the output
  v = eps - x0 (posterrl's flow convention, docs/design.md), so an Euler step is x + (sigma_next - sigma) v;
- images: (B, 3, H, W) in [-1, 1] (posterrl's canvases), H and W multiples of 16.

Guidance, the NFT convention: FLUX.1 Kontext [dev] is guidance-distilled. It has no true classifier-free guidance
by default (the pipeline's `true_cfg_scale` is 1); the guidance scale is an *input* of the transformer (its
guidance embedding), and one transformer call per step gives the guided velocity. posterrl's sampling policy is
that call: the velocity at the distilled guidance scale (`guidance`, 2.5 as in the released examples), one call
per step, no negative prompt. The NFT update then trains the transformer's velocity at that same guidance input,
so the policy that samples and the policy that is trained are one function (DiffusionNFT is CFG-free).
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

# The released examples' distilled guidance scale for Kontext edits (the pipeline's default is 3.5).
DEFAULT_GUIDANCE = 2.5


@dataclass
class PromptEmbeds:
    """Encoded instructions of B samples; plain tensors the caller may keep (no graph, not shared with the cache).

    text:   (B, L, D) T5 hidden states, L = max_sequence_length (512 as the pipeline pads), D = T5 d_model
    pooled: (B, P)    CLIP's pooled output, P = CLIP hidden size
    """

    text: torch.Tensor
    pooled: torch.Tensor

    def repeat_interleave(self, k: int) -> PromptEmbeds:
        """Each sample repeated k times in a row (a prompt group of k samples)."""
        return PromptEmbeds(self.text.repeat_interleave(k, 0), self.pooled.repeat_interleave(k, 0))


@dataclass
class ReferenceLatents:
    """The input images of B samples as condition tokens.

    tokens: (B, Tc, 64) VAE latents ((z - shift) * scale, the distribution's mode), 2 x 2 packed
    ids:    (Tc, 3)     rotary ids [1, row, col] (first axis 1: "an input image"; the noisy tokens have 0)
    """

    tokens: torch.Tensor
    ids: torch.Tensor

    def repeat_interleave(self, k: int) -> ReferenceLatents:
        return ReferenceLatents(self.tokens.repeat_interleave(k, 0), self.ids)


@dataclass
class KontextSample:
    """What `sample` returns.

    latents:   (B, T, 64) packed latents at t = 0 (the pipeline's output_type="latent")
    images:    (B, 3, H, W) decoded, in [-1, 1]; None when decoding was skipped
    sigmas:    (S + 1,) the time grid, 1 .. 0 (shifted; the terminal 0 appended)
    timesteps: (S,) the transformer's time inputs times 1000 (the scheduler's timesteps)
    """

    latents: torch.Tensor
    images: torch.Tensor | None
    sigmas: torch.Tensor
    timesteps: torch.Tensor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2 x 2 patches, row-major (FluxKontextPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w); inverse of `pack_latents` (h, w: latent rows and columns)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, channels // 4, h, w)


def latent_ids(rows: int, cols: int, index: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotary ids (rows * cols, 3) of a packed token grid: [index, row, col] (0 = noisy, 1 = input image)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu of the dynamic time shift: linear in the image's token count (the pipeline's, same operation order)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def latent_grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Latent rows and columns (even, for 2 x 2 packing) of an image of height x width pixels."""
    multiple = vae_scale_factor * 2
    return 2 * (height // multiple), 2 * (width // multiple)


def token_grid(tokens: int, image_size: tuple[int, int] | None, vae_scale_factor: int) -> tuple[int, int]:
    """(rows, cols) of packed tokens of the generated image: from image_size (H, W) px, or square from the count;
    a count that does not fit the size is an error."""
    if image_size is None:
        side = int(round(tokens**0.5))
        rows, cols = side, side
    else:
        rows, cols = (n // 2 for n in latent_grid(*image_size, vae_scale_factor))
    if rows * cols != tokens:
        raise ValueError(f"latents hold {tokens} tokens, a {rows} x {cols} grid expected from image_size")
    return rows, cols


def pipeline_time_grid(scheduler_config: dict[str, Any], num_steps: int, image_seq_len: int,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (S + 1,), timesteps (S,)) as FLUX.1 Kontext's and Qwen-Image-Edit's pipelines compute them: sigmas
    linspace(1, 1/S, S), mu from the noisy token count and the scheduler config, then the scheduler's own
    set_timesteps (its shift, Qwen's exponential one and shift_terminal included, and the terminal 0)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    config = scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device=device, mu=mu)
    return scheduler.sigmas, scheduler.timesteps


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """x + (sigma_next - sigma) v, in float32 and cast back to v's dtype (FlowMatchEulerDiscreteScheduler.step)."""
    return (latents.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


class KontextEditModel(nn.Module):
    """FLUX.1 Kontext's transformer, VAE and text encoders behind the calls posterrl's stages make.

    The text encoders and the VAE are frozen conditioning (encode_prompt / encode_reference run without
    gradients); what training would change is the transformer (`velocity` keeps its graph).
    """

    def __init__(self, transformer: FluxTransformer2DModel, vae: AutoencoderKL, text_encoder: nn.Module,
                 tokenizer: Any, text_encoder_2: nn.Module, tokenizer_2: Any, scheduler_config: dict[str, Any],
                 max_sequence_length: int = 512, prompt_cache_size: int = 256):
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder  # CLIPTextModel: pooled vector only
        self.text_encoder_2 = text_encoder_2  # T5EncoderModel: the token sequence
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler_config)
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8
        self.latent_channels = vae.config.latent_channels  # 16
        # Packing needs even latent sides, so image sides are multiples of 2 * 8 = 16 px.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        # text -> (text (1, L, D), pooled (1, P)), least recently used first; each text encoded alone, so a
        # cached row is bit-identical whatever batch it was asked in. Released sizes: 512 x 4096 bf16 = 4 MiB each.
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.prompt_cache_size = prompt_cache_size

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", **kwargs: Any) -> KontextEditModel:
        """Load a FluxKontextPipeline folder: model_index.json names each component's class (tokenizers too,
        so a released folder's T5TokenizerFast loads as itself, the tiny folder's T5Tokenizer as itself)."""
        directory = Path(directory)
        index = json.loads((directory / "model_index.json").read_text())
        if index.get("_class_name") != "FluxKontextPipeline":
            raise ValueError(f"{directory}: model_index.json names {index.get('_class_name')!r}, "
                             "expected 'FluxKontextPipeline'")

        def load(name: str, **options: Any) -> Any:
            library, class_name = index[name]
            return getattr(importlib.import_module(library), class_name).from_pretrained(directory / name, **options)

        models = {name: load(name, torch_dtype=dtype).to(device).eval()
                  for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(directory / "scheduler"))
        return cls(tokenizer=load("tokenizer"), tokenizer_2=load("tokenizer_2"), scheduler_config=scheduler_config,
                   **models, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def _encode_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One text -> (T5 hidden states (1, L, D), CLIP pooled (1, P)), as the pipeline's encode_prompt."""
        clip_ids = self.tokenizer([text], padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2([text], padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        hidden = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]  # no mask, as FLUX
        return hidden.to(self.text_encoder_2.dtype), pooled.to(self.text_encoder.dtype)

    def encode_prompt(self, texts: list[str], use_cache: bool = True) -> PromptEmbeds:
        """B texts -> PromptEmbeds (text (B, L, D), pooled (B, P)). With `use_cache`, a text seen before is not
        encoded again (up to `prompt_cache_size` texts, least recently used dropped first)."""
        rows = []
        for text in texts:
            if not use_cache:
                rows.append(self._encode_one(text))
                continue
            if text in self._prompt_cache:
                self._prompt_cache.move_to_end(text)
            else:
                self._prompt_cache[text] = self._encode_one(text)
                while len(self._prompt_cache) > self.prompt_cache_size:
                    self._prompt_cache.popitem(last=False)
            rows.append(self._prompt_cache[text])
        # torch.cat copies: the caller's tensors never alias the cache's.
        return PromptEmbeds(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) in [-1, 1] as the pipeline prepares its `image` with `_auto_resize=False`:
        the first image's size floored to multiples of 16, every image resized to it."""
        multiple = self.vae_scale_factor * 2
        height, width = self.image_processor.get_default_height_width(images[0])
        height, width = height // multiple * multiple, width // multiple * multiple
        resized = self.image_processor.resize(images, height, width)
        return self.image_processor.preprocess(resized, height, width)

    @torch.no_grad()
    def encode_reference(self, images: torch.Tensor) -> ReferenceLatents:
        """Input images (B, 3, H, W) in [-1, 1], H and W multiples of 16 -> ReferenceLatents with
        tokens (B, H/16 * W/16, 64) and ids (H/16 * W/16, 3). Encode once per sample and keep it for every step."""
        images = images.to(device=self.device, dtype=self.dtype)
        z = self.vae.encode(images).latent_dist.mode()  # (B, 16, H/8, W/8); the pipeline's sample_mode="argmax"
        z = (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        h, w = z.shape[2:]
        return ReferenceLatents(pack_latents(z), latent_ids(h // 2, w // 2, 1, self.device, self.dtype))

    # ------------------------------------------------------------------ the velocity

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        return latent_grid(height, width, self.vae_scale_factor)

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                 condition: ReferenceLatents | None, guidance: float | torch.Tensor = DEFAULT_GUIDANCE,
                 image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """One transformer call on [noisy ; condition] tokens; the velocity v = eps - x0 of the noisy part.

        latents:       (B, T, 64) noisy packed latents x_t
        t:             (B,) time in [0, 1] (the scheduler's timestep / 1000)
        prompt_embeds: (B, L, D), pooled: (B, P)  from `encode_prompt`
        condition:     ReferenceLatents with tokens (B, Tc, 64), or None for text-to-image
        guidance:      the distilled guidance scale (a float, or (B,) per sample); see the module's docstring
        image_size:    (H, W) in pixels of the generated image; None: square, read from T
        returns        (B, T, 64)
        """
        b, tokens = latents.shape[:2]
        rows, cols = token_grid(tokens, image_size, self.vae_scale_factor)
        ids = latent_ids(rows, cols, 0, latents.device, prompt_embeds.dtype)  # (T, 3)
        hidden = latents
        if condition is not None:
            hidden = torch.cat([latents, condition.tokens.to(latents.dtype)], dim=1)  # (B, T + Tc, 64)
            ids = torch.cat([ids, condition.ids.to(ids.dtype)], dim=0)  # (T + Tc, 3)
        if self.transformer.config.guidance_embeds:
            g = torch.as_tensor(guidance, dtype=torch.float32, device=latents.device)
            g = g.expand(b) if g.ndim == 0 else g  # (B,), float32 as the pipeline's
        else:
            g = None
        out = self.transformer(
            hidden_states=hidden,
            timestep=t.to(latents.dtype),
            guidance=g,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=prompt_embeds.dtype),
            img_ids=ids,
            return_dict=False,
        )[0]  # (B, T + Tc, 64)
        return out[:, :tokens]

    # ------------------------------------------------------------------ sampling

    def time_grid(self, num_steps: int, image_seq_len: int,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (S + 1,), timesteps (S,)) as the pipeline computes them (`pipeline_time_grid`)."""
        return pipeline_time_grid(self.scheduler_config, num_steps, image_seq_len, device)

    def initial_noise(self, batch: int, height: int, width: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """Start noise (B, T, 64), drawn as the pipeline draws it: randn_tensor (B, 16, h, w), then packed."""
        h, w = self._grid(height, width)
        noise = randn_tensor((batch, self.latent_channels, h, w), generator=generator, device=self.device,
                             dtype=dtype or self.dtype)
        return pack_latents(noise)

    euler_step = staticmethod(euler_step)

    @torch.no_grad()
    def sample(self, prompt: PromptEmbeds, condition: ReferenceLatents | None, height: int, width: int,
               num_steps: int = 28, guidance: float | torch.Tensor = DEFAULT_GUIDANCE,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               decode: bool = True) -> KontextSample:
        """Integrate the flow ODE from noise (t = 1) to an edit (t = 0) with Euler steps, one transformer call each.

        prompt: B samples' PromptEmbeds; condition: their ReferenceLatents (B rows; `repeat_interleave` for
        groups); height, width: the output size in px (multiples of 16); noise (B, T, 64) or drawn from
        `generator` exactly as FluxKontextPipeline(generator=...) draws it.
        """
        batch = prompt.text.shape[0]
        latents = noise if noise is not None else self.initial_noise(batch, height, width, generator,
                                                                     prompt.text.dtype)
        latents = latents.to(self.device, prompt.text.dtype)
        sigmas, timesteps = self.time_grid(num_steps, latents.shape[1], self.device)
        for i, timestep in enumerate(timesteps):
            t = timestep.expand(batch).to(latents.dtype) / 1000
            v = self.velocity(latents, t, prompt.text, prompt.pooled, condition, guidance, (height, width))
            latents = self.euler_step(latents, v, sigmas[i], sigmas[i + 1])
        images = self.decode(latents, height, width) if decode else None
        return KontextSample(latents, images, sigmas, timesteps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents (B, T, 64) of a height x width image -> images (B, 3, H, W) in [-1, 1] (clamped)."""
        z = unpack_latents(latents, *self._grid(height, width))  # (B, 16, h, w)
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].clamp(-1.0, 1.0)

    @staticmethod
    def to_numpy(images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1], as the pipeline's output_type="np"."""
        return (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
