"""The edit policy: one interface for every stage (SFT, distillation, rollouts, NFT updates).

The tiny default (`model.kind: tiny_flux`) is diffusers' `FluxTransformer2DModel` at tiny size,
working in pixel space on a square canvas cut into p x p patches (one token = 3*p*p values).
Conditioning follows FLUX.1 Kontext: the tokens of each input image are appended after the noisy
tokens, with rotary ids whose first axis says which image a token belongs to (0 = the image being
generated, i = the i-th input), and the output is read from the noisy tokens only.

The instruction encoder is transformers' `T5EncoderModel` (the class FLUX uses for its long
prompt encoder) at tiny size behind `ByT5Tokenizer`, which is byte-level and needs no vocabulary
file, so nothing is downloaded. It is trained with the transformer. Its masked mean stands in for
FLUX's pooled CLIP vector.

Layout on disk (diffusers style, each part loadable with its own class):
    posterrl_policy.json   spec: kind, canvas, patch size, text length, default sampler
    transformer/           FluxTransformer2DModel.save_pretrained
    text_encoder/          T5EncoderModel.save_pretrained
    tokenizer/             ByT5Tokenizer.save_pretrained
    scheduler/             FlowMatchEulerDiscreteScheduler.save_pretrained
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from torch import nn
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from posterrl.config import ModelConfig, RolloutConfig
from posterrl.files import replace_dir, staging_dir
from posterrl.flow import SamplerConfig, flow_sigmas

SPEC_FILE = "posterrl_policy.json"
MIN_SAMPLE_T = 0.02  # x0-predicting tiny policy: the smallest t its velocity divides by (0.001 is on the grid)


def quiet_model_libraries() -> None:
    """Nothing is downloaded here: hide diffusers/transformers weight-loading bars and hub advice."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@dataclass
class PolicySpec:
    kind: str
    resolution: int  # canvas side R, px
    patch_size: int  # p
    max_text_length: int
    max_inputs: int
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the default for sampling this policy
    # Released pipelines (model.kind flux_kontext): the base checkpoint the export's weights apply to, the
    # distilled guidance scale the policy samples at, and the LoRA the transformer trains (rank 0: in full).
    pretrained_path: str | None = None
    guidance: float | None = None
    lora: dict[str, Any] | None = None
    input_concat: bool = False  # tiny_flux: the first input in the noisy tokens' channels (model.input_concat)
    residual: bool = False  # tiny_flux: latents of one-input samples are output - input (model.residual)
    stretch_rescaled_input: bool = False  # rescaling's input stretched to its output aspect (same key in model)
    input_detail: bool = False  # tiny_flux: outputs of in-frame one-input edits keep the input's detail (same key)
    prediction: str = "velocity"  # tiny_flux: the transformer predicts v, or x0 (model.prediction)

    @property
    def tokens_per_image(self) -> int:
        return (self.resolution // self.patch_size) ** 2

    @classmethod
    def load(cls, directory: str | Path) -> PolicySpec:
        """The spec of an exported policy (its posterrl_policy.json), without loading any weights."""
        directory = Path(directory)
        spec_path = directory / SPEC_FILE
        if not spec_path.is_file():
            raise FileNotFoundError(
                f"{directory}: not an exported posterrl policy (no {SPEC_FILE}); pass a directory "
                "written under <run_dir>/checkpoints/<stage>/"
            )
        raw = json.loads(spec_path.read_text())
        return cls(**{**raw, "sampler": SamplerConfig.from_dict(raw["sampler"])})


class Policy(Protocol):
    """What every stage asks of an edit policy, whichever model it is (posterrl.policies.POLICY_CLASSES).

    A policy is an nn.Module whose `forward(x_t, t, *prepared)` is the training-time velocity. It works on
    latents x of shape (B, *latent_shape): the canvases themselves for a pixel-space policy (`pixel_space`;
    the tiny default), their difference from the input for one-input samples with `model.residual`, VAE
    latents for the released pipelines. Training targets enter through `encode_images`, samples leave through
    `decode_latents` (both given the sample's input canvases), and what a stage hands on or syncs is
    `policy_state()`: every weight for a policy trained in full, the adapters only with LoRA.
    """

    spec: PolicySpec
    pixel_space: bool  # the latents are the canvases: rollouts need not carry them beside the images
    cached_latents: bool  # encoding targets costs a model call (a VAE): sft/distill keep them on disk

    @property
    def latent_shape(self) -> tuple[int, ...]: ...

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, *prepared: torch.Tensor) -> torch.Tensor: ...

    def prepare(self, instructions: list[str], inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Instructions and input canvases (B, N, 3, R, R) -> the conditioning arguments of `forward`."""
        ...

    def condition(self, *prepared: torch.Tensor) -> Any:
        """The encoded condition `velocity` reads, computed once per sample for every sampling step."""
        ...

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def time_grid(self, sampler: SamplerConfig) -> torch.Tensor:
        """The sigmas (S + 1,) from 1 down to 0 this policy samples on with `sampler`'s settings."""
        ...

    def encode_images(self, images: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Canvases (B, 3, R, R) in [-1, 1], made from input canvases (B, N, 3, R, R) -> latents
        (B, *latent_shape); no gradients."""
        ...

    def decode_latents(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Latents (B, *latent_shape) sampled for input canvases (B, N, 3, R, R) -> canvases (B, 3, R, R) in
        [-1, 1]."""
        ...

    def loss_weight(self, t: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(B,) weight of each sample's velocity regression at times t (B,) for input canvases (B, N, 3, R, R):
        1 where the network predicts v; t^2 where it predicts x0, so the loss is the x0 error rather than that
        error / t^2 (which lets the nearly clean samples near t = 0 dominate every step)."""
        ...

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The weights training changes, by state-dict key (what sync, checkpoints of theta_old and exports move)."""
        ...

    def load_policy_state(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load exactly the keys of `policy_state()`; any key missing or unexpected is an error."""
        ...

    def save_pretrained(self, directory: str | Path) -> Path: ...

    # the nn.Module methods the stages call
    def parameters(self, recurse: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def requires_grad_(self, requires_grad: bool = True) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...


def check_state_keys(state: dict[str, Any], expected: list[str], what: str) -> None:
    """Raise naming what differs when `state` does not hold exactly the `expected` keys (a sync that would
    silently bind nothing, or leave weights stale, fails here instead)."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} expected tensors missing {missing[:3]}, {len(unexpected)} "
                         f"unexpected {unexpected[:3]} (a state from another model kind, LoRA rank or targets?)")


@dataclass
class Condition:
    """Encoded condition of a batch of B samples that all have N input images.

    text:       (B, L, D) instruction hidden states
    pooled:     (B, D)    masked mean of `text`
    ref_tokens: (B, N*T, C) packed input-image tokens, T = tokens per image, C = 3*p*p
    ref_ids:    (N*T, 3)  rotary ids [input index (1..N), row, col]
    """

    text: torch.Tensor
    pooled: torch.Tensor
    ref_tokens: torch.Tensor
    ref_ids: torch.Tensor

    def repeat_interleave(self, k: int) -> Condition:
        """Each sample repeated k times in a row (a prompt group of k samples)."""
        return Condition(
            self.text.repeat_interleave(k, 0),
            self.pooled.repeat_interleave(k, 0),
            self.ref_tokens.repeat_interleave(k, 0),
            self.ref_ids,
        )


def _image_ids(grid: int, index: int) -> torch.Tensor:
    """Rotary ids (grid*grid, 3) of one image: [index, row, col]."""
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    return torch.stack([torch.full_like(rows, index), rows, cols], dim=1).float()


class EditPolicy(nn.Module):
    """v_theta(x_t, t, condition) for poster edits in pixel space; `forward` is the training-time call."""

    cached_latents = False  # latents are canvases, or canvases minus the first input: nothing to cache

    # Buffers (register_buffer below), declared for the type checker: nn.Module types attributes as Tensor | Module.
    noisy_ids: torch.Tensor
    txt_ids: torch.Tensor

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: T5EncoderModel,
                 tokenizer: ByT5Tokenizer, spec: PolicySpec):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.spec = spec
        self.pixel_space = not spec.residual  # else a sample's training target is its latents, kept with it
        grid = spec.resolution // spec.patch_size
        self.register_buffer("noisy_ids", _image_ids(grid, 0), persistent=False)  # (T, 3)
        self.register_buffer("txt_ids", torch.zeros(spec.max_text_length, 3), persistent=False)  # (L, 3)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, model: ModelConfig, rollout: RolloutConfig | None = None) -> EditPolicy:
        if model.kind != "tiny_flux":
            raise NotImplementedError(
                f"model.kind={model.kind!r}: only 'tiny_flux' is built in this version of posterrl"
            )
        spec = PolicySpec(
            kind=model.kind,
            resolution=model.resolution,
            patch_size=model.patch_size,
            max_text_length=model.text_encoder.max_length,
            max_inputs=model.max_inputs,
            sampler=SamplerConfig.from_rollout(rollout) if rollout else SamplerConfig(),
            input_concat=model.input_concat,
            residual=model.residual,
            stretch_rescaled_input=model.stretch_rescaled_input,
            input_detail=model.input_detail,
            prediction=model.prediction,
        )
        te, tr = model.text_encoder, model.transformer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.seed)
            text_encoder = T5EncoderModel(
                T5Config(
                    vocab_size=384,  # ByT5: 256 bytes + 3 specials + 125 sentinels
                    d_model=te.d_model,
                    d_kv=te.d_model // te.num_heads,
                    d_ff=te.d_ff,
                    num_layers=te.num_layers,
                    num_heads=te.num_heads,
                    dropout_rate=0.0,
                    feed_forward_proj="gated-gelu",
                )
            )
            transformer = FluxTransformer2DModel(
                patch_size=1,  # patches are packed by the policy, as FluxPipeline packs 2x2 latents
                in_channels=3 * model.patch_size**2 * (2 if model.input_concat else 1),
                out_channels=3 * model.patch_size**2,
                num_layers=tr.num_layers,
                num_single_layers=tr.num_single_layers,
                attention_head_dim=tr.attention_head_dim,
                num_attention_heads=tr.num_attention_heads,
                joint_attention_dim=te.d_model,
                pooled_projection_dim=te.d_model,
                guidance_embeds=False,
                axes_dims_rope=tuple(tr.axes_dims_rope),
            )
            if model.zero_init_output:
                nn.init.zeros_(transformer.proj_out.weight)
                nn.init.zeros_(transformer.proj_out.bias)
        return cls(transformer, text_encoder, ByT5Tokenizer(), spec)

    # ------------------------------------------------------------------ tensors

    def pack(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> (B, T, 3*p*p), tokens in row-major patch order."""
        b, c, r, _ = images.shape
        p, g = self.spec.patch_size, r // self.spec.patch_size
        x = images.reshape(b, c, g, p, g, p)  # (B, 3, g, p, g, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)  # (B, T, 3*p*p)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, 3*p*p) -> (B, 3, R, R); inverse of `pack`."""
        b, t, _ = tokens.shape
        p, g = self.spec.patch_size, self.spec.resolution // self.spec.patch_size
        x = tokens.reshape(b, g, g, 3, p, p)  # (B, g, g, 3, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)  # (B, 3, R, R)

    def tokenize(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> (input_ids (B, L), attention_mask (B, L)), bytes past L cut."""
        enc = self.tokenizer(instructions, padding="max_length", truncation=True,
                             max_length=self.spec.max_text_length, return_tensors="pt")
        device = self.noisy_ids.device
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def encode_condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         inputs: torch.Tensor) -> Condition:
        """Token ids (B, L), mask (B, L) and input canvases (B, N, 3, R, R) -> Condition."""
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        weights = attention_mask.unsqueeze(-1).to(text.dtype)  # (B, L, 1)
        pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
        b, n = inputs.shape[:2]
        ref_tokens = self.pack(inputs.flatten(0, 1)).reshape(b, n * self.spec.tokens_per_image, -1)  # (B, N*T, C)
        grid = self.spec.resolution // self.spec.patch_size
        ref_ids = torch.cat([_image_ids(grid, i + 1) for i in range(n)]).to(self.noisy_ids.device)  # (N*T, 3)
        return Condition(text, pooled, ref_tokens.to(text.dtype), ref_ids)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """x_t (B, 3, R, R), t (B,) in [0, 1] -> predicted velocity eps - x0, (B, 3, R, R)."""
        noisy = self.pack(x_t)  # (B, T, C)
        refs = cond.ref_tokens  # (B, N*T, C)
        if self.spec.input_concat:  # noisy token i carries input 0's token i; inputs fill the second half only
            noisy = torch.cat([noisy, refs[:, : noisy.shape[1]]], dim=-1)  # (B, T, 2C)
            refs = torch.cat([torch.zeros_like(refs), refs], dim=-1)  # (B, N*T, 2C)
        hidden = torch.cat([noisy, refs], dim=1)  # (B, T + N*T, C or 2C)
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=cond.text,
            pooled_projections=cond.pooled,
            timestep=t.to(hidden.dtype),
            img_ids=torch.cat([self.noisy_ids, cond.ref_ids]),
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]  # (B, T + N*T, C)
        raw = self.unpack(out[:, : self.spec.tokens_per_image])  # (B, 3, R, R)
        if not self.predicts_sample(cond.ref_tokens.shape[1] // self.spec.tokens_per_image):
            return raw
        # x0-prediction: x_t = (1 - t) x0 + t eps gives v = eps - x0 = (x_t - x0) / t. Below MIN_SAMPLE_T the division
        # is floored, so training at t -> 0 cannot blow the gradient up (v-loss weight 1/t^2); the scheduler's last
        # sigma before 0 (0.001) then moves x only 1/20 of the way to x0_hat, a step of 0.001 either way.
        tb = t.to(raw.dtype).clamp(min=MIN_SAMPLE_T).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return (x_t - raw) / tb  # (B, 3, R, R)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Training-time call: encode the condition and predict the velocity in one graph."""
        return self.velocity(x_t, t, self.encode_condition(input_ids, attention_mask, inputs))

    # ------------------------------------------------------------------ the Policy interface

    @property
    def latent_shape(self) -> tuple[int, ...]:
        r = self.spec.resolution
        return (3, r, r)

    def prepare(self, instructions: list[str], inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(input_ids (B, L), attention_mask (B, L), inputs (B, N, 3, R, R)): the text encoder trains, so the
        instruction is encoded inside `forward`, in the training graph."""
        ids, mask = self.tokenize(instructions)
        return ids, mask, inputs.to(ids.device)

    def condition(self, *prepared: torch.Tensor) -> Condition:
        return self.encode_condition(*prepared)

    def time_grid(self, sampler: SamplerConfig) -> torch.Tensor:
        return flow_sigmas(sampler.num_steps, sampler.shift)

    def encode_images(self, images: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return images - inputs[:, 0].to(images) if self.is_residual(inputs) else images

    def decode_latents(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        canvases = latents + inputs[:, 0].to(latents) if self.is_residual(inputs) else latents
        return canvases.clamp(-1.0, 1.0)

    def loss_weight(self, t: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if not self.predicts_sample(inputs.shape[1]):
            return torch.ones_like(t)  # (B,)
        return t.clamp(min=MIN_SAMPLE_T).pow(2)  # (B,) the same floor as the division in `velocity`

    def predicts_sample(self, num_inputs: int) -> bool:
        """Whether the transformer's output is x0_hat (else v) for samples with num_inputs input canvases."""
        return self.spec.prediction == "sample" or (self.spec.prediction == "sample_for_edits" and num_inputs == 1)

    def is_residual(self, inputs: torch.Tensor) -> bool:
        """Whether samples with input canvases (B, N, 3, R, R) have residual latents (output - input): one-input
        edits with model.residual; otherwise the latents are the canvases."""
        return self.spec.residual and inputs.shape[1] == 1

    def policy_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def load_policy_state(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        self.load_state_dict(state, assign=assign)

    # ------------------------------------------------------------------ disk

    def save_pretrained(self, directory: str | Path) -> Path:
        """The whole export, written into a sibling folder first and moved in at once (posterrl/files.py)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(directory)
        self.transformer.save_pretrained(tmp / "transformer")
        self.text_encoder.save_pretrained(tmp / "text_encoder")
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        s = self.spec.sampler
        FlowMatchEulerDiscreteScheduler(shift=s.shift).save_pretrained(tmp / "scheduler")
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(self.spec), indent=2) + "\n")
        return replace_dir(tmp, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> EditPolicy:
        directory = Path(directory)
        spec = PolicySpec.load(directory)
        transformer = FluxTransformer2DModel.from_pretrained(directory / "transformer")
        text_encoder = T5EncoderModel.from_pretrained(directory / "text_encoder")
        tokenizer = ByT5Tokenizer.from_pretrained(directory / "tokenizer")
        return cls(transformer, text_encoder, tokenizer, spec).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
