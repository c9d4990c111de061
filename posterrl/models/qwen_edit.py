"""Qwen-Image-Edit as posterrl sees it: the released components, posterrl's own sampling loop.

`QwenEditModel.from_pretrained(DIR)` loads a QwenImageEditPipeline folder (a `posterrl model make-tiny --kind
qwen_image_edit` folder, or a downloaded Qwen/Qwen-Image-Edit: the same layout) as its parts: the MMDiT
transformer, the Qwen-Image VAE, the Qwen2.5-VL text encoder and its processor, and the scheduler's config.
It splits what `QwenImageEditPipeline.__call__` does into the pieces the rl stages need:

    preprocess(images)            -> (B, 3, Hc, Wc) condition images in [-1, 1], at the condition size
    encode_prompt(texts, images)  -> PromptEmbeds      Qwen2.5-VL hidden states of prompt + image, and their mask
    encode_reference(images)      -> ReferenceLatents  VAE-encoded, 2 x 2 packed condition tokens and their grid
    velocity(latents, t, ...)     -> one transformer call on [noisy ; condition] tokens, the noisy part's output
    sample(...)                   -> the flow-matching Euler loop, written here, and the decoded images
    decode(latents)               -> images

and reproduces the pipeline's numbers: the same condition sizing (`calculate_dimensions` to about 1 Mpx, by
default), the same prompt encoding (the edit template with the condition image, the template's first 64 hidden
states dropped, zero-padded to the batch's longest), the same time grid (sigmas linspace(1, 1/S, S), mu from
the noisy token count, then the scheduler's own `set_timesteps`, which applies Qwen's exponential time shift and
stretches the grid to end at shift_terminal 0.02 before the final 0), the same seeded start noise (diffusers'
`randn_tensor` of the (B, 1, 16, h, w) latent video shape, then packed), the same transformer inputs and the
same Euler update (float32, as `FlowMatchEulerDiscreteScheduler.step`). tests/posterrl/test_qwen_edit.py
holds it to the pipeline.

Conventions (the pipeline's, kept so that outputs compare):
- packed latents: (B, T, 64), T = (H / 16) * (W / 16) tokens of 2 x 2 x 16 latent channels, row-major; the
  VAE's latents are (B, 16, 1, h, w) (a one-frame video), normalised as (z - latents_mean) / latents_std;
- time: the transformer takes t = timestep / 1000 in [0, 1], with x_t = (1 - t) x0 + t eps and the output
  v = eps - x0 (posterrl's flow convention, docs/design.md), so an Euler step is x + (sigma_next - sigma) v;
- images: (B, 3, H, W) in [-1, 1] (posterrl's canvases), H and W multiples of 16;
- the condition image is sized on its own: by default as the pipeline does (about 1024 x 1024 whatever the
  output size, so Tc = 4096 condition tokens), or at a size the caller gives (`condition_size`), which the
  pipeline cannot do: posterrl trains on small canvases, where a 1 Mpx condition would cost 64 x 64 tokens
  per sample. Both the VAE tokens and the image Qwen2.5-VL sees then use that size; the released model was
  trained with ~1 Mpx conditions, so a small one is a change of input distribution, not a reproduction.

Guidance, the NFT convention: Qwen-Image-Edit is *not* guidance-distilled. Its transformer has no guidance input
(guidance_embeds False); the pipeline's guidance is true classifier-free guidance, on only when a negative prompt is
given with true_cfg_scale > 1: two transformer calls per step (the prompt, the negative prompt), combined as
neg + s (cond - neg) and rescaled per token to the conditional velocity's norm (`true_cfg`). The model card's
example samples that way (true_cfg_scale 4, negative prompt " "; recalled, not checked here without hub access).
posterrl's sampling policy is CFG-free: one transformer call per step on the instruction (true_cfg_scale 1, no
negative prompt), and the NFT update trains that same velocity, so the policy that samples and the policy that is
trained are one function (DiffusionNFT is CFG-free). `sample(..., negative=..., true_cfg_scale=4.0)` reproduces the
pipeline's guided sampling, for evaluation only. Expect the released weights' unguided samples to be weaker than
their guided ones: that unguided policy is what the training starts from.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from posterrl.models.kontext import (
    euler_step,
    latent_grid,
    pack_latents,
    pipeline_time_grid,
    token_grid,
    unpack_latents,
)
from posterrl.models.tiny_pipelines import qwen_prompt_template

# The pipeline's condition area: the input image is scaled to about this many pixels, sides multiples of 32.
CONDITION_AREA = 1024 * 1024
# The pipeline's default number of steps.
DEFAULT_STEPS = 50


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """(height, width) of about `target_area` pixels at aspect ratio width / height, sides rounded to multiples
    of 32 (the pipeline's `calculate_dimensions`, which returns (width, height, None))."""
    width = (target_area * ratio) ** 0.5
    height = width / ratio
    return round(height / 32) * 32, round(width / 32) * 32


@dataclass
class PromptEmbeds:
    """Encoded instructions (each with its condition image) of B samples; plain tensors the caller may keep.

    text: (B, L, D) Qwen2.5-VL's last hidden states without the template's first 64 tokens, zero-padded to the
          longest of the batch (L); D = the text model's hidden size (3584 released)
    mask: (B, L) int64, 1 for a real token, 0 for padding
    """

    text: torch.Tensor
    mask: torch.Tensor

    def repeat_interleave(self, k: int) -> PromptEmbeds:
        """Each sample repeated k times in a row (a prompt group of k samples)."""
        return PromptEmbeds(self.text.repeat_interleave(k, 0), self.mask.repeat_interleave(k, 0))

    def transformer_mask(self) -> torch.Tensor | None:
        """The mask as the pipeline hands it to the transformer: None when nothing is padded (its encode_prompt
        drops an all-ones mask, and the transformer then attends without one, a different kernel path)."""
        return None if bool(self.mask.all()) else self.mask


@dataclass
class ReferenceLatents:
    """The condition images of B samples as tokens.

    tokens: (B, Tc, 64) normalised VAE latents ((z - mean) / std, the distribution's mode), 2 x 2 packed
    grid:   (rows, cols) of the packed tokens, Hc/16 x Wc/16: the transformer's img_shapes entry (1, rows, cols)
    """

    tokens: torch.Tensor
    grid: tuple[int, int]

    def repeat_interleave(self, k: int) -> ReferenceLatents:
        return ReferenceLatents(self.tokens.repeat_interleave(k, 0), self.grid)


@dataclass
class QwenEditSample:
    """What `sample` returns.

    latents:   (B, T, 64) packed latents at t = 0 (the pipeline's output_type="latent")
    images:    (B, 3, H, W) decoded, in [-1, 1]; None when decoding was skipped
    sigmas:    (S + 1,) the time grid, 1 .. shift_terminal, then 0
    timesteps: (S,) the transformer's time inputs times 1000 (the scheduler's timesteps)
    """

    latents: torch.Tensor
    images: torch.Tensor | None
    sigmas: torch.Tensor
    timesteps: torch.Tensor


def _image_key(image: Image.Image) -> tuple[str, tuple[int, int], str]:
    """A cache key for a PIL image's content: mode, size and a digest of its pixels (not the pixels: the
    released condition images are megabytes each)."""
    return image.mode, image.size, hashlib.sha256(image.tobytes()).hexdigest()


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The pipeline's true classifier-free guidance: uncond + scale (cond - uncond), each token rescaled to the
    conditional velocity's norm (over the 64 channels). cond, uncond: (B, T, 64) -> (B, T, 64)."""
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)  # (B, T, 1)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)  # (B, T, 1)
    return combined * (cond_norm / combined_norm)


class QwenEditModel(nn.Module):
    """Qwen-Image-Edit's transformer, VAE and Qwen2.5-VL text encoder behind the calls posterrl's stages make.

    The text encoder and the VAE are frozen conditioning (encode_prompt / encode_reference run without
    gradients); what training would change is the transformer (`velocity` keeps its graph).
    """

    def __init__(self, transformer: QwenImageTransformer2DModel, vae: AutoencoderKLQwenImage, text_encoder: nn.Module,
                 processor: Any, scheduler_config: dict[str, Any], condition_size: tuple[int, int] | None = None,
                 prompt_cache_size: int = 256):
        super().__init__()
        if transformer.config.get("guidance_embeds", False):
            # Qwen-Image-Edit has none; a guidance-distilled variant would need its guidance input threaded through.
            raise ValueError("a guidance-distilled QwenImageTransformer2DModel (guidance_embeds) is not supported")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder  # Qwen2_5_VLForConditionalGeneration: its last hidden states only
        self.processor = processor  # Qwen2VLProcessor: the template's text and the condition image, tokenised
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample)  # 8
        self.latent_channels = transformer.config.in_channels // 4  # 16: the pipeline's noise channels
        # Packing needs even latent sides, so image sides are multiples of 2 * 8 = 16 px.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.condition_size = condition_size  # None: the pipeline's ~1 Mpx sizing (see the module docstring)
        # The edit template (system prompt, then the user turn with the image and the instruction) and how many
        # leading hidden states to drop: read from the installed diffusers' pipeline, so they follow its version.
        self.prompt_template, self.prompt_template_drop = qwen_prompt_template()
        # (text, image key, condition size) -> hidden states (1, L_i, D), least recently used first; each sample
        # encoded alone, so a cached row is bit-identical whatever batch asked for it. Released: ~1.4k tokens
        # (the image's ~1.3k + the instruction) x 3584 bf16 = about 10 MiB each.
        self._prompt_cache: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self.prompt_cache_size = prompt_cache_size

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", processor: Any = None, **kwargs: Any) -> QwenEditModel:
        """Load a QwenImageEditPipeline folder: model_index.json names each component's class. The processor
        is Qwen2VLProcessor, which transformers builds only with torchvision (for its video part); without it
        the same class's image-and-text code is used (tiny_pipelines.image_only_processor), or pass `processor`.
        The tokenizer/ folder is not loaded: the processor holds the same tokenizer."""
        directory = Path(directory)
        index = json.loads((directory / "model_index.json").read_text())
        if index.get("_class_name") != "QwenImageEditPipeline":
            raise ValueError(f"{directory}: model_index.json names {index.get('_class_name')!r}, "
                             "expected 'QwenImageEditPipeline'")

        def load(name: str, **options: Any) -> Any:
            library, class_name = index[name]
            return getattr(importlib.import_module(library), class_name).from_pretrained(directory / name, **options)

        if processor is None:
            try:
                processor = load("processor")
            except ImportError:  # "Qwen2VLVideoProcessor requires the Torchvision library"
                from posterrl.models.tiny_pipelines import image_only_processor

                processor = image_only_processor(directory)
        models = {name: load(name, torch_dtype=dtype).to(device).eval()
                  for name in ("transformer", "vae", "text_encoder")}
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(directory / "scheduler"))
        return cls(processor=processor, scheduler_config=scheduler_config, **models, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # ------------------------------------------------------------------ conditioning

    def condition_hw(self, image: Image.Image, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """(Hc, Wc) the condition image is encoded at: `size` or `self.condition_size` when given (multiples of
        16), else the pipeline's: about 1 Mpx at the image's aspect ratio, sides multiples of 32."""
        size = size or self.condition_size
        if size is None:
            return calculate_dimensions(CONDITION_AREA, image.size[0] / image.size[1])
        multiple = self.vae_scale_factor * 2
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(f"condition size {size}: height and width must be multiples of {multiple}")
        return size

    def _resize(self, images: list[Image.Image], size: tuple[int, int] | None) -> tuple[list[Image.Image], int, int]:
        """The pipeline's condition resize: every image to the size computed from the first (Lanczos)."""
        height, width = self.condition_hw(images[0], size)
        return [self.image_processor.resize(image, height, width) for image in images], height, width

    def preprocess(self, images: list[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
        """PIL images -> condition images (B, 3, Hc, Wc) in [-1, 1], as the pipeline prepares its `image`: every
        image resized to the condition size of the first (`condition_hw`)."""
        resized, height, width = self._resize(images, size)
        return self.image_processor.preprocess(resized, height, width)

    @torch.no_grad()
    def _encode_one(self, text: str, image: Image.Image) -> torch.Tensor:
        """One instruction with its (resized) condition image -> hidden states (1, L, D), as the pipeline's
        _get_qwen_prompt_embeds for a batch of one (no padding, so its mask selects every token)."""
        inputs = self.processor(text=[self.prompt_template.format(text)], images=[image], padding=True,
                                return_tensors="pt").to(self.text_encoder.device)
        outputs = self.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    pixel_values=inputs.get("pixel_values"),
                                    image_grid_thw=inputs.get("image_grid_thw"), output_hidden_states=True)
        hidden = outputs.hidden_states[-1]  # (1, L_template + L, D)
        # The system prompt's states go (64 released tokens); the image's tokens, the instruction and the assistant
        # header stay.
        return hidden[:, self.prompt_template_drop:].to(self.text_encoder.dtype)  # (1, L, D)

    def encode_prompt(self, texts: list[str], images: list[Image.Image], size: tuple[int, int] | None = None,
                      use_cache: bool = True) -> PromptEmbeds:
        """B instructions and their B condition images (PIL, as given to `preprocess`; resized here the same way)
        -> PromptEmbeds (text (B, L, D), mask (B, L)), zero-padded to the longest as the pipeline pads. With
        `use_cache`, a (text, image, size) seen before is not encoded again (up to `prompt_cache_size`, least
        recently used dropped first)."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts and {len(images)} images: one condition image per text")
        height, width = self.condition_hw(images[0], size)
        rows = []
        for text, image in zip(texts, images, strict=True):
            key = (text, _image_key(image), height, width)
            if use_cache and key in self._prompt_cache:
                self._prompt_cache.move_to_end(key)
                rows.append(self._prompt_cache[key])
                continue
            row = self._encode_one(text, self.image_processor.resize(image, height, width))
            if use_cache:
                self._prompt_cache[key] = row
                while len(self._prompt_cache) > self.prompt_cache_size:
                    self._prompt_cache.popitem(last=False)
            rows.append(row)
        longest = max(row.shape[1] for row in rows)
        # torch.cat copies: the caller's tensors never alias the cache's.
        text_embeds = torch.cat([torch.cat([r, r.new_zeros(1, longest - r.shape[1], r.shape[2])], 1)
                                 for r in rows])  # (B, L, D)
        mask = torch.cat([torch.cat([torch.ones(1, r.shape[1], dtype=torch.long),
                                     torch.zeros(1, longest - r.shape[1], dtype=torch.long)], 1)
                          for r in rows]).to(text_embeds.device)  # (B, L)
        return PromptEmbeds(text_embeds, mask)

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    @torch.no_grad()
    def encode_reference(self, images: torch.Tensor) -> ReferenceLatents:
        """Condition images (B, 3, Hc, Wc) in [-1, 1], sides multiples of 16 -> ReferenceLatents with tokens
        (B, Hc/16 * Wc/16, 64) and grid (Hc/16, Wc/16). The batch is encoded in one VAE call, as the pipeline
        does; encode once per sample and keep it for every step."""
        frames = images.to(device=self.device, dtype=self.vae.dtype).unsqueeze(2)  # (B, 3, 1, Hc, Wc)
        z = self.vae.encode(frames).latent_dist.mode()  # (B, 16, 1, hc, wc); the pipeline's sample_mode="argmax"
        mean, std = self._latent_stats(z)
        z = (z - mean) / std
        h, w = z.shape[3:]
        return ReferenceLatents(pack_latents(z[:, :, 0]), (h // 2, w // 2))  # (B, Tc, 64)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE config's latents_mean and latents_std as (1, 16, 1, 1, 1), on `like`'s device and dtype."""
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    # ------------------------------------------------------------------ the velocity

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        return latent_grid(height, width, self.vae_scale_factor)

    def img_shapes(self, batch: int, rows: int, cols: int,
                   condition: ReferenceLatents | None) -> list[list[tuple[int, int, int]]]:
        """The transformer's img_shapes: per sample, (frames, rows, cols) of the noisy grid, then the condition's."""
        shapes = [(1, rows, cols)]
        if condition is not None:
            shapes.append((1, *condition.grid))
        return [shapes] * batch

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, prompt: PromptEmbeds,
                 condition: ReferenceLatents | None, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """One transformer call on [noisy ; condition] tokens; the velocity v = eps - x0 of the noisy part.

        latents:    (B, T, 64) noisy packed latents x_t
        t:          (B,) time in [0, 1] (the scheduler's timestep / 1000)
        prompt:     PromptEmbeds of the B samples (text (B, L, D), mask (B, L))
        condition:  ReferenceLatents with tokens (B, Tc, 64), or None for text-to-image
        image_size: (H, W) in pixels of the generated image; None: square, read from T
        returns     (B, T, 64)
        """
        b, tokens = latents.shape[:2]
        rows, cols = token_grid(tokens, image_size, self.vae_scale_factor)
        hidden = latents
        if condition is not None:
            hidden = torch.cat([latents, condition.tokens.to(latents.dtype)], dim=1)  # (B, T + Tc, 64)
        out = self.transformer(
            hidden_states=hidden,
            timestep=t.to(latents.dtype),
            guidance=None,
            encoder_hidden_states_mask=prompt.transformer_mask(),
            encoder_hidden_states=prompt.text,
            img_shapes=self.img_shapes(b, rows, cols, condition),
            return_dict=False,
        )[0]  # (B, T + Tc, 64)
        return out[:, :tokens]

    # ------------------------------------------------------------------ sampling

    def time_grid(self, num_steps: int, image_seq_len: int,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (S + 1,), timesteps (S,)) as the pipeline computes them: sigmas linspace(1, 1/S, S), mu from
        the noisy token count (not the condition's) and the scheduler config, then the scheduler's own
        set_timesteps: Qwen's exponential shift e^mu / (e^mu + 1/s - 1), the grid stretched to end at
        shift_terminal (0.02), and a terminal 0 appended (`pipeline_time_grid`)."""
        return pipeline_time_grid(self.scheduler_config, num_steps, image_seq_len, device)

    def initial_noise(self, batch: int, height: int, width: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """Start noise (B, T, 64), drawn as the pipeline draws it: randn_tensor (B, 1, 16, h, w), then packed."""
        h, w = self._grid(height, width)
        noise = randn_tensor((batch, 1, self.latent_channels, h, w), generator=generator, device=self.device,
                             dtype=dtype or self.dtype)
        return pack_latents(noise[:, 0])  # the frame axis is 1, so (B, 1, C, h, w) reads as (B, C, h, w)

    euler_step = staticmethod(euler_step)

    @torch.no_grad()
    def sample(self, prompt: PromptEmbeds, condition: ReferenceLatents | None, height: int, width: int,
               num_steps: int = DEFAULT_STEPS, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, decode: bool = True, negative: PromptEmbeds | None = None,
               true_cfg_scale: float = 1.0) -> QwenEditSample:
        """Integrate the flow ODE from noise (t = 1) to an edit (t = 0) with Euler steps.

        prompt: B samples' PromptEmbeds; condition: their ReferenceLatents (B rows; `repeat_interleave` for
        groups); height, width: the output size in px (multiples of 16); noise (B, T, 64) or drawn from
        `generator` exactly as QwenImageEditPipeline(generator=...) draws it.
        The policy (the default) is one transformer call per step. For evaluation, `true_cfg_scale` > 1 with
        `negative` (B rows, e.g. encode_prompt([" "] * B, images)) is the pipeline's true CFG: two calls per step.
        """
        if true_cfg_scale > 1 and negative is None:
            raise ValueError(f"true_cfg_scale {true_cfg_scale} needs negative prompt embeddings")
        uncond = negative if true_cfg_scale > 1 else None  # as the pipeline: a negative at scale <= 1 is unused
        batch = prompt.text.shape[0]
        latents = noise if noise is not None else self.initial_noise(batch, height, width, generator,
                                                                     prompt.text.dtype)
        latents = latents.to(self.device, prompt.text.dtype)
        sigmas, timesteps = self.time_grid(num_steps, latents.shape[1], self.device)
        for i, timestep in enumerate(timesteps):
            t = timestep.expand(batch).to(latents.dtype) / 1000
            v = self.velocity(latents, t, prompt, condition, (height, width))
            if uncond is not None:
                v = true_cfg(v, self.velocity(latents, t, uncond, condition, (height, width)), true_cfg_scale)
            latents = self.euler_step(latents, v, sigmas[i], sigmas[i + 1])
        images = self.decode(latents, height, width) if decode else None
        return QwenEditSample(latents, images, sigmas, timesteps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents (B, T, 64) of a height x width image -> images (B, 3, H, W) in [-1, 1] (clamped)."""
        z = unpack_latents(latents, *self._grid(height, width)).unsqueeze(2).to(self.vae.dtype)  # (B, 16, 1, h, w)
        mean, std = self._latent_stats(z)
        z = z / (1.0 / std) + mean  # z * std + mean, written as the pipeline writes it so the numbers are its own
        return self.vae.decode(z, return_dict=False)[0][:, :, 0].clamp(-1.0, 1.0)  # (B, 3, H, W)

    @staticmethod
    def to_numpy(images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1], as the pipeline's output_type="np"."""
        return (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
