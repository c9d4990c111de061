"""Scaling on paper: memory, FLOPs and times of DiffusionNFT with LoRA on FLUX.1 Kontext [dev] and Qwen-Image-Edit.

    PYTHONPATH=. python scripts/estimate_scaling.py      # prints every table of docs/scaling.md (markdown)

Nothing here is measured on a GPU. What is counted, is counted exactly on the released architectures, built with
the released configs on the meta device (no weights, no memory, no download):

- parameters: the diffusers / transformers classes' own parameters;
- LoRA parameters: rank x (in + out) of every targeted nn.Linear, found by walking the modules;
- FLOPs of a transformer call: one forward on meta tensors at 1024 x 1024 with the condition image's tokens; a hook
  on every nn.Linear records the tokens it saw (2 x tokens x in x out), scaled_dot_product_attention records its
  shapes (4 x heads x q_len x kv_len x head_dim); checked against torch's FlopCounterMode on the same call;
- activation memory: the same forward with autograd on; what autograd saves for backward (saved_tensors_hooks), per
  transformer block, with attention replaced by a stand-in that keeps what a fused (flash) kernel keeps (q, k, v,
  out, the fp32 log-sum-exp); the live bytes of a no-grad call (a dispatch mode that follows every tensor's storage);
- VAE FLOPs: FlopCounterMode on a meta encode / decode; text encoders and the reward VLM: Linear shapes x tokens
  plus attention.

Times are those FLOPs over (peak dense bf16 x an assumed MFU); transfers are bytes over an assumed bandwidth. Every
assumption is a named constant below (docs/scaling.md lists them with their reasons); ranges span them. Runs on a
CPU in about 30 s; `tests/test_scaling_estimates.py` checks the counts against the published sizes.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

GiB = 2**30
KINDS = ("flux_kontext", "qwen_image_edit")
TITLES = {"flux_kontext": "FLUX.1 Kontext [dev]", "qwen_image_edit": "Qwen-Image-Edit"}

# ---------------------------------------------------------------- assumptions (docs/scaling.md lists each)


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense peak, tensor cores (NVIDIA datasheets: H100 SXM 1,979 with sparsity, A100 312)
    nvlink_gbs: tuple[float, float]  # NCCL broadcast bus bandwidth inside one node, assumed (GB/s)


GPUS = (Gpu("H100", 989.0, (200.0, 350.0)), Gpu("A100", 312.0, (150.0, 230.0)))
MFU = (0.35, 0.45)  # model FLOPs utilisation, assumed, for every GPU computation (transformer, VAE, VLMs)
INTER_NODE_GBS = (25.0, 50.0)  # NCCL bandwidth between nodes, per GPU pair, assumed (200-400 Gb/s NICs)
OBJECT_STORE_GBS = (1.0, 5.0)  # Ray object store between nodes (serialise, TCP, copy), assumed
GPU_BUDGET_GIB = 75.0  # an 80 GB card shows ~79 GiB; ~4 GiB left for the CUDA context, NCCL buffers, allocator slack
GPUS_PER_NODE = 8
# ZeRO-3 (deepspeed.zero_stage: 3): the parameters a rank holds gathered at once, at most DeepSpeed's default
# stage3_max_live_parameters (1e9), in bf16
ZERO3_LIVE_PARAMETERS, BF16 = 10**9, 2

RESOLUTION = 1024  # output and condition image, pixels per side
T5_TOKENS, CLIP_TOKENS = 512, 77  # FluxKontextPipeline's max_sequence_length; CLIP's positions
INSTRUCTION_TOKENS = 40  # a poster edit instruction, assumed
JUDGE_TEXT_TOKENS = 150  # the judge's / reward model's rubric, task and instruction text, assumed
VLM_INFLIGHT_SEQUENCES = 32  # the judge's batch in vLLM (KV cache), assumed
# Qwen-Image-Edit: QwenImageEditPipeline drops the first 64 hidden states (its system prompt); what is left is
# <|vision_start|> image tokens <|vision_end|> instruction <|im_end|> \n <|im_start|> assistant \n.
QWEN_DROPPED_TOKENS, QWEN_KEPT_TEMPLATE_TOKENS = 64, 2 + 5
# Qwen2.5-VL's processor: 14 px patches, 2 x 2 merge, 3,136 .. 12,845,056 pixels (the released preprocessor_config).
VL_PATCH, VL_MERGE, VL_MIN_PIXELS, VL_MAX_PIXELS = 14, 2, 3136, 12845056

LORA_RANKS = (32, 64)
PLAN_RANK, PLAN_TARGET = 64, "attn+ff"  # the LoRA the memory, time and sync tables assume (the larger one)
REWARD_LORA_RANK = 16  # the presets' reward_model.lora_rank (q/k/v/o of the language model, posterrl/models/vlm_reward)
ROLLOUT_BATCH = 16  # samples per rollout transformer call (one prompt group), assumed
MICRO_BATCHES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Job:
    """A PosterOmni-scale rl job. One rl epoch = one sample -> score -> train -> publish round (rl.epochs)."""

    tasks: int = 6
    prompts: int = 3000  # the prompt pool: 500 per task
    prompts_per_epoch: int = 48  # rl.prompts_per_epoch: 8 per task
    epochs: int = 300
    group_size: int = 16  # rollout.group_size (K)
    steps: tuple[int, ...] = (10, 28)  # rollout.num_steps: the presets' 10, FLUX.1 Kontext's default 28
    timesteps_per_sample: int = 1  # posterrl trains each sample at one t of the rollout grid per pass
    passes: int = 1  # rl.passes
    batch_size: int = 16  # rl.batch_size, samples per optimizer step (the presets' default)
    nodes: tuple[int, ...] = (1, 2, 4)

    @property
    def images_per_epoch(self) -> int:
        return self.prompts_per_epoch * self.group_size


JOB = Job()

# ---------------------------------------------------------------- the released architectures on the meta device

# Keyword arguments of the released classes (the released config.json values that set the sizes).
FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
    scaling_factor=0.3611, sample_size=1024)
CLIP_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=CLIP_TOKENS, hidden_act="quick_gelu")
T5_XXL: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu", dropout_rate=0.0)
QWEN_TRANSFORMER: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
QWEN_VAE: dict[str, Any] = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0)
QWEN25_VL_7B_TEXT: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN25_VL_7B_VISION: dict[str, Any] = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=VL_PATCH,
    spatial_merge_size=VL_MERGE, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])

# Published sizes: (parameters, where the figure comes from). The figures are rounded as published.
PUBLISHED: dict[tuple[str, str], tuple[float, str]] = {
    ("flux_kontext", "transformer"): (12e9, "FLUX.1 Kontext [dev] model card: '12 billion parameter'"),
    ("qwen_image_edit", "transformer"): (20e9, "Qwen-Image technical report (arXiv:2508.02324): '20B MMDiT'"),
    ("qwen_image_edit", "text_encoder"): (8.29e9, "Qwen2.5-VL-7B-Instruct on the Hugging Face Hub: 8.29B"),
    ("qwen_image_edit", "vae"): (127e6, "Wan technical report (arXiv:2503.20314): Wan-VAE, 127M"),
}
# The sizes the brief of this page names (three digits); the test checks the counts against these too.
REFERENCE_SIZES = {("flux_kontext", "transformer"): 11.9e9, ("qwen_image_edit", "transformer"): 20.4e9,
                   ("qwen_image_edit", "text_encoder"): 8.3e9}


def _quiet() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" on .to(bfloat16)
    transformers_logging.set_verbosity_error()


def qwen25_vl_7b() -> Any:
    """Qwen2.5-VL-7B (Qwen2_5_VLForConditionalGeneration) on meta: Qwen-Image-Edit's text encoder and the reward VLM."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION,
                              tie_word_embeddings=False)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


@cache
def components(kind: str) -> dict[str, Any]:
    """The pipeline's model components with the released configs, on meta, in bf16 (as released). Built once."""
    _quiet()
    if kind == "flux_kontext":
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        with torch.device("meta"):
            built = {"transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER),
                     "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)),
                     "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
                     "vae": AutoencoderKL(**FLUX_VAE)}
    elif kind == "qwen_image_edit":
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        with torch.device("meta"):
            built = {"transformer": QwenImageTransformer2DModel(**QWEN_TRANSFORMER),
                     "text_encoder": qwen25_vl_7b(),
                     "vae": AutoencoderKLQwenImage(**QWEN_VAE)}
    else:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    return {name: module.to(torch.bfloat16).eval().requires_grad_(False) for name, module in built.items()}


@cache
def reward_vlm() -> Any:
    """The reward server's VLM (the presets' judge and Bradley-Terry backbone): Qwen2.5-VL-7B."""
    _quiet()
    return qwen25_vl_7b().to(torch.bfloat16).eval().requires_grad_(False)


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


COMPONENT_LABELS = {
    ("flux_kontext", "transformer"): "FluxTransformer2DModel: 19 double + 38 single blocks, 24 x 128, text 4096",
    ("flux_kontext", "text_encoder"): "CLIPTextModel: ViT-L/14 text tower, 768 x 12",
    ("flux_kontext", "text_encoder_2"): "T5EncoderModel: T5 v1.1 XXL encoder, 4096 x 24",
    ("flux_kontext", "vae"): "AutoencoderKL: (128, 256, 512, 512), 16 latent channels",
    ("qwen_image_edit", "transformer"): "QwenImageTransformer2DModel: 60 blocks, 24 x 128, text 3584",
    ("qwen_image_edit", "text_encoder"): "Qwen2_5_VLForConditionalGeneration: Qwen2.5-VL-7B",
    ("qwen_image_edit", "vae"): "AutoencoderKLQwenImage: base 96, (1, 2, 4, 4)",
}

# ---------------------------------------------------------------- LoRA targets

ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",  # the image stream's attention
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")  # the text stream's
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",  # FLUX double blocks
                "proj_mlp", "proj_out",  # FLUX single blocks (proj_out: attention output and MLP output, fused)
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")  # Qwen-Image blocks
TARGETS = {"attn": ATTENTION, "attn+ff": ATTENTION + FEED_FORWARD}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def lora_targets(transformer: nn.Module, target: str) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules inside the transformer blocks whose name ends with one of the target suffixes. Not the
    AdaLN modulation linears (norm1.linear, img_mod.1, ...), not the embedders and not the final projection."""
    suffixes = TARGETS[target]
    return [(name, module) for name, module in transformer.named_modules()
            if isinstance(module, nn.Linear) and name.split(".")[0] in BLOCK_LISTS
            and any(name.endswith("." + suffix) for suffix in suffixes)]


def lora_parameters(transformer: nn.Module, target: str, rank: int) -> int:
    """A (rank x in) and B (out x rank) per targeted Linear."""
    return sum(rank * (m.in_features + m.out_features) for _, m in lora_targets(transformer, target))


@cache
def lora_count(kind: str, target: str = PLAN_TARGET, rank: int = PLAN_RANK) -> int:
    return lora_parameters(components(kind)["transformer"], target, rank)


def blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{attr}.{i}", block) for attr in BLOCK_LISTS for i, block in enumerate(getattr(transformer, attr, []))]

# ---------------------------------------------------------------- tokens


def vl_grid(height: int, width: int) -> tuple[int, int]:
    """Qwen2.5-VL's patch grid of an image (the processor's smart_resize: multiples of 28 px within the bounds)."""
    factor = VL_PATCH * VL_MERGE
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > VL_MAX_PIXELS or h * w < VL_MIN_PIXELS:
        scale = math.sqrt((VL_MAX_PIXELS if h * w > VL_MAX_PIXELS else VL_MIN_PIXELS) / (h * w))
        h, w = max(factor, round(h * scale / factor) * factor), max(factor, round(w * scale / factor) * factor)
    return h // VL_PATCH, w // VL_PATCH


def vl_image_tokens(size: int = RESOLUTION) -> int:
    rows, cols = vl_grid(size, size)
    return rows * cols // VL_MERGE**2


@dataclass(frozen=True)
class Tokens:
    noisy: int  # the image being denoised: (H/16) x (W/16) packed 2 x 2 latent patches
    condition: int  # the condition image's packed latents, concatenated to the noisy ones
    text: int  # the text stream: T5 hidden states (FLUX) or Qwen2.5-VL hidden states of the template (Qwen)

    @property
    def image(self) -> int:
        return self.noisy + self.condition

    @property
    def total(self) -> int:
        return self.image + self.text


def tokens(kind: str, size: int = RESOLUTION) -> Tokens:
    latent = (size // 16) ** 2
    if kind == "flux_kontext":
        return Tokens(latent, latent, T5_TOKENS)
    # QwenImageEditPipeline hands the VLM the condition image at ~1024^2, so its image tokens join the text stream.
    return Tokens(latent, latent, vl_image_tokens(size) + QWEN_KEPT_TEMPLATE_TOKENS + INSTRUCTION_TOKENS)


def transformer_inputs(kind: str, tok: Tokens, size: int = RESOLUTION) -> dict[str, Any]:
    side = size // 16
    with torch.device("meta"):
        x = torch.empty(1, tok.image, 64, dtype=torch.bfloat16)
        t = torch.empty(1, dtype=torch.bfloat16)
        if kind == "flux_kontext":
            return dict(hidden_states=x, encoder_hidden_states=torch.empty(1, tok.text, 4096, dtype=torch.bfloat16),
                        pooled_projections=torch.empty(1, 768, dtype=torch.bfloat16), timestep=t,
                        guidance=torch.empty(1, dtype=torch.bfloat16), img_ids=torch.empty(tok.image, 3),
                        txt_ids=torch.empty(tok.text, 3), return_dict=False)
        return dict(hidden_states=x, encoder_hidden_states=torch.empty(1, tok.text, 3584, dtype=torch.bfloat16),
                    timestep=t, img_shapes=[[(1, side, side), (1, side, side)]], return_dict=False)

# ---------------------------------------------------------------- instrumented forwards


class _FusedAttention(torch.autograd.Function):
    """Shapes only: what a fused attention kernel (flash / memory-efficient) keeps for backward: q, k, v, the output
    and an fp32 log-sum-exp per query row; no (q_len x kv_len) matrix."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise NotImplementedError("meta shapes only")


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, for everything created while the mode is on (a storage
    counts once, whatever views share it; it is freed when its last tensor is). Python's cycle collector is paused
    meanwhile, so that the count does not depend on when it runs: a tensor held only by a reference cycle counts as
    alive until the mode ends (as it may well be on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, list[int]] = {}  # storage id -> [tensors alive, bytes]
        self._gc = False

    def __enter__(self) -> _LiveBytes:
        gc.collect()
        self._gc = gc.isenabled()
        gc.disable()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self._gc:
            gc.enable()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.storages:
                    self.storages[key] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.storages[key][0] += 1
                weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.storages[key]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


@dataclass
class CallProfile:
    """One transformer call on one sample (batch 1), at the tokens given."""

    tokens: Tokens
    linear_tokens: dict[str, int] = field(default_factory=dict)  # Linear name -> tokens it processed
    attention: list[tuple[int, int, int, int]] = field(default_factory=list)  # heads, q_len, kv_len, head_dim
    inference_peak: int = 0  # live bytes at the peak of a no-grad call
    saved: dict[str, int] = field(default_factory=dict)  # LoRA target -> bytes autograd keeps for backward
    block_saved_max: dict[str, int] = field(default_factory=dict)  # ... the largest one block keeps
    outside_saved: dict[str, int] = field(default_factory=dict)  # ... kept outside the blocks (embedders, head)
    block_inputs: int = 0  # bytes of the blocks' inputs (what per-block gradient checkpointing keeps)
    lora_intermediate: dict[str, int] = field(default_factory=dict)  # target -> bytes of A x per rank (x rank)

    def linear_flops(self, transformer: nn.Module) -> float:
        shapes = {n: m for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
        return sum(2.0 * t * shapes[n].in_features * shapes[n].out_features for n, t in self.linear_tokens.items())

    def per_sample_parameters(self, transformer: nn.Module) -> int:
        """Parameters of the Linears that ran on one vector per sample (AdaLN modulation, time and guidance
        embedders): they count in the weights but add next to nothing to the FLOPs."""
        return sum(parameters(m) for n, m in transformer.named_modules()
                   if isinstance(m, nn.Linear) and self.linear_tokens.get(n) == 1)

    def attention_flops(self) -> float:
        return sum(4.0 * h * q * k * d for h, q, k, d in self.attention)  # Q K^T and P V

    def lora_flops(self, transformer: nn.Module, target: str, rank: int) -> float:
        return sum(2.0 * self.linear_tokens[n] * rank * (m.in_features + m.out_features)
                   for n, m in lora_targets(transformer, target))


@contextmanager
def _fused_attention(record: list[tuple[int, int, int, int]] | None = None) -> Iterator[None]:
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if record is not None:
            record.append((query.shape[-3], query.shape[-2], key.shape[-2], query.shape[-1]))
        return _FusedAttention.apply(query, key, value)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa):
        yield


def _linear_tokens_hooks(transformer: nn.Module, prof: CallProfile) -> list[Any]:
    def linear_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            prof.linear_tokens[name] = prof.linear_tokens.get(name, 0) + args[0].numel() // module.in_features
        return hook

    return [module.register_forward_hook(linear_hook(name)) for name, module in transformer.named_modules()
            if isinstance(module, nn.Linear)]


@cache
def call_profile(kind: str, size: int = RESOLUTION) -> CallProfile:
    """One no-grad call on meta tensors: the tokens each Linear saw, the attention shapes, the live-bytes peak."""
    transformer = components(kind)["transformer"]
    prof = CallProfile(tokens(kind, size))
    hooks = _linear_tokens_hooks(transformer, prof)
    live = _LiveBytes()
    try:
        with torch.no_grad(), _fused_attention(prof.attention), live:
            transformer(**transformer_inputs(kind, prof.tokens, size))
    finally:
        for hook in hooks:
            hook.remove()
    prof.inference_peak = live.peak
    return prof


def _saved_by_block(transformer: nn.Module, inputs: dict[str, Any], targeted: list[tuple[str, nn.Linear]]
                    ) -> tuple[dict[str, int], int]:
    """One forward with autograd on, the targeted weights requiring grad: the bytes autograd keeps for backward by
    transformer block ("outside" for the rest), parameters left out, each storage once; and the bytes of the
    blocks' inputs (tensor arguments, each storage once)."""
    params = {_key(p) for p in transformer.parameters()}
    saved: dict[int, tuple[str, int]] = {}
    inputs_seen: dict[int, int] = {}
    current = ["outside"]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _key(tensor)
        if key not in params and key not in saved:
            saved[key] = (current[-1], tensor.untyped_storage().nbytes())
        return tensor

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current.append(name)
            for tensor in _tensors((args, kwargs)):
                inputs_seen.setdefault(_key(tensor), tensor.untyped_storage().nbytes())
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        current.pop()

    for _, module in targeted:
        module.weight.requires_grad_(True)
    handles = [h for name, block in blocks(transformer) for h in (
        block.register_forward_pre_hook(enter(name), with_kwargs=True), block.register_forward_hook(leave))]
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = transformer(**inputs)
        del out
    finally:
        for handle in handles:
            handle.remove()
        transformer.requires_grad_(False)
    per_block: dict[str, int] = {}
    for where, nbytes in saved.values():
        per_block[where] = per_block.get(where, 0) + nbytes
    return per_block, sum(inputs_seen.values())


@cache
def profile(kind: str, size: int = RESOLUTION) -> CallProfile:
    """call_profile plus what autograd keeps for backward, once per LoRA target set: the targeted weights require
    grad, so autograd keeps each targeted Linear's input, as LoRA's A does; the rank-wide A x that LoRA's B keeps
    is added from the token counts."""
    transformer = components(kind)["transformer"]
    prof = call_profile(kind, size)
    inputs = transformer_inputs(kind, prof.tokens, size)
    for target in TARGETS:
        targeted = lora_targets(transformer, target)
        per_block, prof.block_inputs = _saved_by_block(transformer, inputs, targeted)
        prof.outside_saved[target] = per_block.pop("outside", 0)
        prof.saved[target] = prof.outside_saved[target] + sum(per_block.values())
        prof.block_saved_max[target] = max(per_block.values())
        prof.lora_intermediate[target] = sum(prof.linear_tokens[n] * 2 for n, _ in targeted)  # bf16, per rank unit
    return prof


def flop_counter_total(kind: str, size: int = RESOLUTION) -> float:
    """torch's own FLOP count of the same call (FlopCounterMode, attention as torch computes it on meta)."""
    transformer = components(kind)["transformer"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(**transformer_inputs(kind, tokens(kind, size), size))
    return float(counter.get_total_flops())


def transformer_flops(kind: str, lora: bool = True) -> float:
    """FLOPs of one forward of one sample, with the planning LoRA unmerged (adapter path) when lora."""
    transformer = components(kind)["transformer"]
    prof = call_profile(kind)
    extra = prof.lora_flops(transformer, PLAN_TARGET, PLAN_RANK) if lora else 0.0
    return prof.linear_flops(transformer) + prof.attention_flops() + extra

# ---------------------------------------------------------------- encoders, VAEs, reward VLM


@cache
def vae_flops(kind: str, size: int = RESOLUTION) -> tuple[float, float, int]:
    """(encode FLOPs, decode FLOPs, decode's live-bytes peak) of one image, counted by FlopCounterMode on meta."""
    vae = components(kind)["vae"]
    with torch.device("meta"):
        image = torch.empty(1, 3, size, size, dtype=torch.bfloat16)
        latent = torch.empty(1, 16, size // 8, size // 8, dtype=torch.bfloat16)
    if kind == "qwen_image_edit":  # a video VAE: (B, C, frames, H, W)
        image, latent = image[:, :, None], latent[:, :, None]
    results = []
    for call in (lambda: vae.encode(image), lambda: vae.decode(latent)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        results.append(float(counter.get_total_flops()))
    live = _LiveBytes()
    with torch.no_grad(), _fused_attention(), live:
        vae.decode(latent)
    return results[0], results[1], live.peak


def _linear_sum(module: nn.Module, prefix: str = "") -> int:
    return sum(m.in_features * m.out_features for n, m in module.named_modules()
               if isinstance(m, nn.Linear) and n.startswith(prefix))


def dense_encoder_flops(module: nn.Module, n_tokens: int, width: int, layers: int) -> float:
    """A text transformer: every Linear on every token, plus full self-attention (4 x S^2 x width per layer)."""
    return 2.0 * n_tokens * _linear_sum(module) + 4.0 * n_tokens**2 * width * layers


def vlm_flops(vlm: Any, images: int, text_tokens: int, size: int = RESOLUTION, lm_head: bool = False) -> float:
    """Qwen2.5-VL on `images` images of size^2 px and `text_tokens` other tokens. Vision: Linears per patch, window
    attention (8 x 8 patches) in 28 blocks and full attention in 4; merger per merged token; language model: Linears
    per token and causal attention counted in full (an upper bound: fused kernels skip about half); the LM head on
    every token (lm_head, as a plain forward computes it) or on the last one (a judge's one-token answer)."""
    rows, cols = vl_grid(size, size)
    patches = rows * cols
    merged = patches // VL_MERGE**2
    vision = QWEN25_VL_7B_VISION
    depth, width = vision["depth"], vision["hidden_size"]
    full = len(vision["fullatt_block_indexes"])
    window = (vision["window_size"] // VL_PATCH) ** 2
    patch_embed = sum(p.numel() for p in vlm.model.visual.patch_embed.parameters())
    per_image = (2.0 * patches * (_linear_sum(vlm, "model.visual.blocks") + patch_embed)
                 + 2.0 * merged * _linear_sum(vlm, "model.visual.merger")
                 + 4.0 * width * patches * (window * (depth - full) + patches * full))
    seq = images * vl_image_tokens(size) + text_tokens
    text = QWEN25_VL_7B_TEXT
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    head = _linear_sum(vlm, "lm_head")
    language = 2.0 * seq * _linear_sum(vlm, "model.language_model") + 4.0 * seq**2 * hidden * layers
    return images * per_image + language + 2.0 * head * (seq if lm_head else 1)


def prompt_encoding_flops(kind: str) -> float:
    """Text encoders once per prompt (FLUX: CLIP + T5 XXL; Qwen: Qwen2.5-VL on the condition image and template)."""
    parts = components(kind)
    if kind == "flux_kontext":
        return (dense_encoder_flops(parts["text_encoder"], CLIP_TOKENS, 768, 12)
                + dense_encoder_flops(parts["text_encoder_2"], T5_TOKENS, 4096, 24))
    text = QWEN_DROPPED_TOKENS + QWEN_KEPT_TEMPLATE_TOKENS + INSTRUCTION_TOKENS
    return vlm_flops(parts["text_encoder"], 1, text, lm_head=True)


def reward_flops_per_image() -> tuple[float, float]:
    """(judge, Bradley-Terry model) FLOPs per scored sample: both Qwen2.5-VL-7B reading the input image and the
    output image (1024^2 each) and the text; the judge answers one token, the BT head reads the last hidden state."""
    vlm = reward_vlm()
    judge = vlm_flops(vlm, 2, JUDGE_TEXT_TOKENS, lm_head=False)
    bt = vlm_flops(vlm, 2, JUDGE_TEXT_TOKENS, lm_head=False) - 2.0 * _linear_sum(vlm, "lm_head")
    return judge, bt


def vlm_kv_bytes_per_token() -> int:
    text = QWEN25_VL_7B_TEXT
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2  # K and V, bf16


def reward_lora_parameters() -> int:
    vlm = reward_vlm()
    return sum(REWARD_LORA_RANK * (m.in_features + m.out_features) for n, m in vlm.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("model.language_model")
               and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"))

# ---------------------------------------------------------------- memory


def gib(nbytes: float) -> float:
    return nbytes / GiB


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU by component, for one model (bf16 weights, the planning LoRA)."""

    transformer: int
    text_encoders: int
    vae: int
    lora: int  # one adapter (theta or theta_old), bf16
    adam: int  # fp32 master copy + m + v of theta's adapter, unpartitioned
    grads: int  # fp32 gradient accumulation of theta's adapter
    act_no_ckpt: int  # one sample of the NFT micro step, no checkpointing
    act_ckpt: int  # ... with per-block gradient checkpointing
    act_nograd: int  # one sample's working set in a no-grad call (v_old, v_ref, a sampling step)
    vae_decode: int  # one image's VAE decode working set
    reward: int  # the reward GPU: judge + BT model + BT LoRA + KV cache

    def learner(self, micro: int, ckpt: bool, encoders: bool, ranks: int = 1, zero3: bool = False) -> int:
        """A learner rank: the base (the reference is the base with adapters off), theta, theta_old, optimizer
        states and gradients (partitioned over `ranks` by ZeRO-2), the activations of `micro` samples. With
        `zero3` the frozen base is sharded over the ranks too, plus the parameters DeepSpeed gathers at once
        (at most ZERO3_LIVE_PARAMETERS)."""
        act = (self.act_ckpt if ckpt else self.act_no_ckpt) + self.act_nograd
        base = (self.transformer // ranks + min(self.transformer, ZERO3_LIVE_PARAMETERS * BF16) if zero3
                else self.transformer)
        return (base + 2 * self.lora + (self.adam + self.grads) // ranks + micro * act
                + (self.text_encoders if encoders else 0))

    def rollout(self, batch: int = ROLLOUT_BATCH) -> int:
        """A rollout actor: the base with theta_old, the text encoders and the VAE, a batch of samples in flight."""
        return (self.transformer + self.lora + self.text_encoders + self.vae + batch * self.act_nograd
                + self.vae_decode)

    def colocated(self, micro: int, processes: int, ranks: int, batch: int = ROLLOUT_BATCH) -> int:
        """Sampling and training on the same GPU, in one process (one base under both adapters) or in two
        processes (a base each); text encoders and VAE resident; the phases' activations do not overlap."""
        phases = max(micro * (self.act_ckpt + self.act_nograd), batch * self.act_nograd + self.vae_decode)
        return (processes * self.transformer + self.text_encoders + self.vae + 2 * self.lora
                + (self.adam + self.grads) // ranks + phases)


@cache
def memory(kind: str) -> Memory:
    parts = components(kind)
    transformer = parts["transformer"]
    prof = profile(kind)
    lora = lora_count(kind)
    target = PLAN_TARGET
    lora_act = prof.lora_intermediate[target] * PLAN_RANK
    # Peaks (assumed composition): no checkpointing, everything saved plus one block's backward working set;
    # per-block checkpointing, the blocks' inputs and what lives outside the blocks, plus one block recomputed
    # and its backward working set (2 x the largest block).
    no_ckpt = prof.saved[target] + lora_act + prof.block_saved_max[target]
    ckpt = (prof.outside_saved[target] + prof.block_inputs + 2 * prof.block_saved_max[target]
            + lora_act // len(blocks(transformer)))
    encoders = sum(2 * parameters(m) for n, m in parts.items() if n.startswith("text_encoder"))
    vlm = 2 * parameters(reward_vlm())
    kv = VLM_INFLIGHT_SEQUENCES * (2 * vl_image_tokens() + JUDGE_TEXT_TOKENS) * vlm_kv_bytes_per_token()
    return Memory(transformer=2 * parameters(transformer), text_encoders=encoders, vae=2 * parameters(parts["vae"]),
                  lora=2 * lora, adam=12 * lora, grads=4 * lora, act_no_ckpt=no_ckpt, act_ckpt=ckpt,
                  act_nograd=prof.inference_peak, vae_decode=vae_flops(kind)[2],
                  reward=2 * vlm + 2 * reward_lora_parameters() + kv)


def max_micro(mem: Memory, ckpt: bool, encoders: bool, ranks: int) -> int:
    fits = [m for m in MICRO_BATCHES if gib(mem.learner(m, ckpt, encoders, ranks)) <= GPU_BUDGET_GIB]
    return max(fits) if fits else 0

# ---------------------------------------------------------------- times


def span(flops: float, gpu: Gpu) -> tuple[float, float]:
    """Seconds for `flops` on one GPU: (at the high MFU, at the low MFU)."""
    return flops / (gpu.bf16_tflops * 1e12 * MFU[1]), flops / (gpu.bf16_tflops * 1e12 * MFU[0])


@dataclass(frozen=True)
class Work:
    """FLOPs per unit of work for one model."""

    forward: float  # one transformer call, one sample, LoRA adapter unmerged
    forward_base: float  # ... adapters off (v_ref)
    backward: float  # frozen base: input gradients of every Linear, LoRA weight gradients, fused attention backward
    prompt: float  # text encoders + the condition's VAE encode, once per prompt
    decode: float  # VAE decode, once per image
    reward: float  # judge + BT model, per image

    def image(self, steps: int, group: int) -> float:
        return steps * self.forward + self.decode + self.prompt / group

    def train_sample(self, ckpt: bool = True) -> float:
        """v_theta with grad, v_old and v_ref without, backward, and the recomputation under checkpointing."""
        return 2 * self.forward + self.forward_base + self.backward + (self.forward if ckpt else 0.0)


@cache
def work(kind: str) -> Work:
    transformer = components(kind)["transformer"]
    prof = call_profile(kind)
    linear, attention = prof.linear_flops(transformer), prof.attention_flops()
    lora = prof.lora_flops(transformer, PLAN_TARGET, PLAN_RANK)
    encode, decode, _ = vae_flops(kind)
    judge, bt = reward_flops_per_image()
    # Backward with the base frozen: one matmul per Linear (input gradient), two per LoRA matmul, and a fused
    # attention backward of 2.5 x its forward (recomputes Q K^T, then dV, dP, dQ, dK).
    backward = linear + 2 * lora + 2.5 * attention
    return Work(forward=linear + attention + lora, forward_base=linear + attention, backward=backward,
                prompt=prompt_encoding_flops(kind) + encode, decode=decode, reward=judge + bt)


def lora_sync_bytes(kind: str, wire_bytes: int) -> int:
    return wire_bytes * lora_count(kind)


def experience_bytes(kind: str, job: Job = JOB) -> int:
    """What the rollouts hand the learners per epoch so that the learners hold neither text encoders nor VAE: each
    sample's packed latents, each prompt's text-stream hidden states (and FLUX's pooled CLIP vector) and its
    condition latents, bf16."""
    tok = tokens(kind)
    width = 4096 if kind == "flux_kontext" else 3584
    per_prompt = tok.text * width * 2 + tok.condition * 64 * 2 + (768 * 2 if kind == "flux_kontext" else 0)
    return job.images_per_epoch * tok.noisy * 64 * 2 + job.prompts_per_epoch * per_prompt


def allreduce_seconds(nbytes: float, ranks: int, gbs: float) -> float:
    return 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * nbytes / (gbs * 1e9)


@dataclass(frozen=True)
class Plan:
    """One job on nodes x 8 GPUs: the colocated layout and the best disaggregated split. Epoch seconds are
    (fast, slow): MFU 45% and the fast bandwidths, MFU 35% and the slow ones."""

    gpus: int
    colocated: tuple[int, int]  # GPUs that sample and train, GPUs that score
    colocated_batch: int  # the largest rollout batch that fits beside the training state (0: none fits)
    colocated_s: tuple[float, float]
    split: tuple[int, int, int]  # disaggregated: GPUs that sample, train, score
    off_policy_s: tuple[float, float]
    sync_s: tuple[float, float]

    def job_s(self, epochs: int) -> tuple[float, float]:
        """The whole job at the faster layout that fits."""
        best = min((self.off_policy_s, self.colocated_s) if self.colocated_batch else (self.off_policy_s,))
        return best[0] * epochs, best[1] * epochs


def plan(kind: str, gpu: Gpu, nodes: int, steps: int, job: Job = JOB) -> Plan:
    """Epoch times of the layouts. Sampling and scoring overlap (chunks are scored as they finish); colocated GPUs
    sample, then train, and need no network sync (theta_old is updated on every learner rank); disaggregated
    off-policy overlaps generation (epoch e + 1) with training (epoch e) + sync, sync mode runs them in turn."""
    w, mem = work(kind), memory(kind)
    total = nodes * GPUS_PER_NODE
    images = job.images_per_epoch
    trained = images * job.passes * job.timesteps_per_sample
    optimizer_steps = math.ceil(trained / job.batch_size)
    grad_bytes = 2 * lora_count(kind)  # bf16 gradients of theta

    def phases(rollout: int, learner: int, reward: int, end: int) -> tuple[float, float, float]:
        """(generate = sample with scoring overlapped, train incl. gradient all-reduce, sync) seconds."""
        generate = max(span(images * w.image(steps, job.group_size), gpu)[end] / rollout,
                       span(images * w.reward, gpu)[end] / reward)
        links = gpu.nvlink_gbs if learner <= GPUS_PER_NODE else INTER_NODE_GBS
        train = (span(trained * w.train_sample(), gpu)[end] / learner
                 + optimizer_steps * allreduce_seconds(grad_bytes, learner, links[1 - end]))
        sync_links = gpu.nvlink_gbs if nodes == 1 else INTER_NODE_GBS
        return generate, train, lora_sync_bytes(kind, 2) / (sync_links[1 - end] * 1e9)

    # colocated: as few scoring GPUs as keep up with the sampling
    ratio = w.reward / w.image(steps, job.group_size)
    reward = next(n for n in range(1, total) if n >= (total - n) * ratio)
    both = total - reward
    batches = [b for b in (16, 8, 4, 2, 1) if gib(mem.colocated(1, 1, both, b)) <= GPU_BUDGET_GIB]
    fast, slow = (phases(both, both, reward, end) for end in (0, 1))
    colocated = (fast[0] + fast[1], slow[0] + slow[1])
    # disaggregated: the split with the shortest off-policy epoch
    best = min((max(g, t + y), total - learner - reward, learner, reward)
               for reward in range(1, total - 1) for learner in range(1, total - reward)
               for g, t, y in [phases(total - learner - reward, learner, reward, 0)])
    split = best[1:]
    (g0, t0, y0), (g1, t1, y1) = (phases(*split, end) for end in (0, 1))
    return Plan(gpus=total, colocated=(both, reward), colocated_batch=batches[0] if batches else 0,
                colocated_s=colocated, split=split, off_policy_s=(max(g0, t0 + y0), max(g1, t1 + y1)),
                sync_s=(g0 + t0 + y0, g1 + t1 + y1))

# ---------------------------------------------------------------- tables


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_range(pair: tuple[float, float], digits: int = 2) -> str:
    low, high = sorted(pair)
    return f"{low:.{digits}f}–{high:.{digits}f}"


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{seconds / 60:.1f} min"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def duration_range(pair: tuple[float, float]) -> str:
    low, high = sorted(pair)
    return f"{fmt_duration(low)} – {fmt_duration(high)}"


def parameter_rows() -> list[list[str]]:
    rows = []
    for kind in KINDS:
        for name, module in components(kind).items():
            count = parameters(module)
            published = PUBLISHED.get((kind, name))
            ref, source = (f"{published[0] / 1e9:.3g} B", published[1]) if published else ("—", "—")
            diff = f"{(count / published[0] - 1) * 100:+.1f}%" if published else "—"
            rows.append([TITLES[kind], f"`{name}`", COMPONENT_LABELS[(kind, name)], f"{count:,}", ref, diff, source])
    vlm = parameters(reward_vlm())
    rows.append(["reward server", "judge, BT backbone", "Qwen2_5_VLForConditionalGeneration: Qwen2.5-VL-7B",
                 f"{vlm:,}", "8.29 B", f"{(vlm / 8.29e9 - 1) * 100:+.1f}%", "as the text encoder above"])
    return rows


def report(check_flops: bool = True) -> str:
    started = time.perf_counter()
    out: list[str] = []
    say = out.append
    rows: list[list[Any]]

    say("### Parameters (counted on meta)\n")
    say(table(["model", "component", "class and released config", "parameters", "published", "difference",
               "source"], parameter_rows()))
    vlm = reward_vlm()
    say(f"\nQwen2.5-VL-7B splits into vision tower {parameters(vlm.model.visual):,}, language model "
        f"{parameters(vlm.model.language_model):,}, LM head {parameters(vlm.lm_head):,}.")

    say("\n### LoRA parameters\n")
    rows = []
    for kind in KINDS:
        transformer = components(kind)["transformer"]
        base = parameters(transformer)
        for target in TARGETS:
            linears = len(lora_targets(transformer, target))
            for rank in LORA_RANKS:
                n = lora_parameters(transformer, target, rank)
                rows.append([TITLES[kind], target, rank, linears, f"{n:,}", f"{100 * n / base:.2f}%",
                             f"{2 * n / 1e6:.0f}", f"{4 * n / 1e6:.0f}"])
    say(table(["model", "targets", "rank", "Linears", "parameters", "of the transformer", "MB bf16", "MB fp32"], rows))

    say("\n### Tokens and FLOPs of one transformer call (one sample, 1024 x 1024, condition image included)\n")
    rows = []
    for kind in KINDS:
        transformer, prof = components(kind)["transformer"], call_profile(kind)
        tok = prof.tokens
        linear, attention = prof.linear_flops(transformer), prof.attention_flops()
        check = "—"
        if check_flops:
            counted = flop_counter_total(kind)
            check = f"{counted / 1e12:.1f} ({(linear + attention) / counted - 1:+.2%})"
        lora = prof.lora_flops(transformer, PLAN_TARGET, PLAN_RANK)
        rows.append([TITLES[kind], tok.noisy, tok.condition, tok.text, tok.total, f"{linear / 1e12:.1f}",
                     f"{attention / 1e12:.1f}", f"{(linear + attention) / 1e12:.1f}", check,
                     f"{lora / 1e12:.1f}", f"{prof.per_sample_parameters(transformer) / 1e9:.2f} B"])
    say(table(["model", "noisy", "condition", "text", "sequence", "Linear TFLOP", "attention TFLOP", "total TFLOP",
               "FlopCounterMode TFLOP", f"+ LoRA r{PLAN_RANK} {PLAN_TARGET}", "parameters run once per sample"],
              rows))

    say("\n### FLOPs outside the transformer (TFLOP)\n")
    rows = []
    for kind in KINDS:
        encode, decode, _ = vae_flops(kind)
        rows.append([TITLES[kind], f"{prompt_encoding_flops(kind) / 1e12:.2f}", f"{encode / 1e12:.2f}",
                     f"{decode / 1e12:.2f}"])
    say(table(["model", "text encoders, per prompt", "VAE encode (condition), per prompt", "VAE decode, per image"],
              rows))
    judge, bt = reward_flops_per_image()
    say(f"\nReward per sample (input + output image at 1024^2 = {2 * vl_image_tokens()} image tokens, "
        f"{JUDGE_TEXT_TOKENS} text tokens): judge {judge / 1e12:.1f} TFLOP, Bradley-Terry model {bt / 1e12:.1f} "
        f"TFLOP. Qwen2.5-VL sees a 1024^2 image as {vl_grid(RESOLUTION, RESOLUTION)} patches, "
        f"{vl_image_tokens()} tokens after the 2 x 2 merge.")

    say("\n### Memory per GPU by component (GiB)\n")
    mems = {kind: memory(kind) for kind in KINDS}
    comp_rows = [
        ("transformer weights, bf16", lambda m: m.transformer),
        ("text encoders, bf16", lambda m: m.text_encoders),
        ("VAE, bf16", lambda m: m.vae),
        (f"LoRA theta, bf16 (r{PLAN_RANK}, {PLAN_TARGET})", lambda m: m.lora),
        ("LoRA theta_old, bf16", lambda m: m.lora),
        ("Adam: fp32 master + m + v of theta (unpartitioned)", lambda m: m.adam),
        ("... ZeRO-2 over 8 ranks", lambda m: m.adam // 8),
        ("transformer weights, ZeRO-3 over 8 ranks, + the gathered live parameters", lambda m: m.learner(
            0, True, False, 8, zero3=True) - m.learner(0, True, False, 8) + m.transformer),
        ("gradients of theta, fp32", lambda m: m.grads),
        ("activations, 1 sample, no checkpointing", lambda m: m.act_no_ckpt),
        ("activations, 1 sample, per-block checkpointing", lambda m: m.act_ckpt),
        ("no-grad call (v_old, v_ref, a sampling step), 1 sample", lambda m: m.act_nograd),
        ("VAE decode of one 1024^2 image", lambda m: m.vae_decode),
        ("reward GPU: judge + BT Qwen2.5-VL-7B, BT LoRA, KV cache", lambda m: m.reward),
    ]
    say(table(["component", *(TITLES[k] for k in KINDS)],
              [[label, *(f"{gib(get(mems[k])):.2f}" for k in KINDS)] for label, get in comp_rows]))
    prof_rows = []
    for kind in KINDS:
        prof = profile(kind)
        prof_rows.append([TITLES[kind], f"{gib(prof.saved['attn']):.1f}", f"{gib(prof.saved['attn+ff']):.1f}",
                          f"{gib(prof.block_saved_max[PLAN_TARGET]):.2f}", f"{gib(prof.block_inputs):.2f}",
                          f"{gib(prof.outside_saved[PLAN_TARGET]):.2f}"])
    say("\nWhat autograd keeps for one sample (GiB), by LoRA target set, and the pieces of the checkpointed peak:\n")
    say(table(["model", "saved, LoRA attn", "saved, LoRA attn+ff", "largest block", "blocks' inputs",
               "outside the blocks"], prof_rows))

    say(f"\n### Per role (GiB; budget {GPU_BUDGET_GIB:.0f} GiB of an 80 GB card)\n")
    rows = []
    for kind in KINDS:
        m = mems[kind]
        roles = [(f"learner rank, micro batch {micro}, checkpointing, text encoders off the GPU",
                  m.learner(micro, True, False, 8)) for micro in (1, 2, 4)]
        roles += [("learner rank, micro batch 2, checkpointing, ZeRO-3 over 8 ranks",
                   m.learner(2, True, False, 8, zero3=True)),
                  ("learner rank, micro batch 2, checkpointing, text encoders resident", m.learner(2, True, True, 8)),
                  ("learner rank, micro batch 1, no checkpointing", m.learner(1, False, False, 8)),
                  (f"rollout actor, batch {ROLLOUT_BATCH}", m.rollout()),
                  (f"colocated, one process (one base), rollout batch {ROLLOUT_BATCH}", m.colocated(1, 1, 7)),
                  ("colocated, two processes (a base each), rollout batch 8", m.colocated(1, 2, 7, 8)),
                  ("reward GPU", m.reward)]
        rows += [[TITLES[kind], role, f"{gib(nbytes):.1f}", "yes" if gib(nbytes) <= GPU_BUDGET_GIB else "**no**"]
                 for role, nbytes in roles]
    say(table(["model", "role", "GiB", "fits"], rows))
    for kind in KINDS:
        say(f"\n{TITLES[kind]}: largest micro batch per learner rank with checkpointing: "
            f"{max_micro(mems[kind], True, False, 8)} (text encoders off the GPU), "
            f"{max_micro(mems[kind], True, True, 8)} (resident); without checkpointing: "
            f"{max_micro(mems[kind], False, False, 8)}.")

    say(f"\n### Rollout images/s (MFU {MFU[0]:.0%}–{MFU[1]:.0%})\n")
    rows = []
    for kind in KINDS:
        w = work(kind)
        for gpu in GPUS:
            for steps in JOB.steps:
                per_image = span(w.image(steps, JOB.group_size), gpu)
                rate = (1 / per_image[1], 1 / per_image[0])
                rows.append([TITLES[kind], gpu.name, steps, f"{w.image(steps, JOB.group_size) / 1e12:.0f}",
                             fmt_range(per_image, 1), fmt_range(rate, 3), fmt_range((8 * rate[0], 8 * rate[1]), 2)])
    say(table(["model", "GPU", "steps", "TFLOP per image", "s per image per GPU", "images/s per GPU",
               "images/s on 8 GPUs"], rows))

    say("\n### Reward throughput (one GPU, judge + BT model per sample)\n")
    rows = []
    for gpu in GPUS:
        per = span(judge + bt, gpu)
        rows.append([gpu.name, f"{(judge + bt) / 1e12:.0f}", fmt_range(per, 2), fmt_range((1 / per[1], 1 / per[0]))])
    say(table(["GPU", "TFLOP per sample", "s per sample", "samples/s"], rows))

    say(f"\n### NFT step (LoRA r{PLAN_RANK} {PLAN_TARGET}, per-block checkpointing)\n")
    rows = []
    for kind in KINDS:
        w = work(kind)
        grad_bytes = 2 * lora_sync_bytes(kind, 1)
        for gpu in GPUS:
            per = span(w.train_sample(), gpu)
            reduce = (allreduce_seconds(grad_bytes, 8, gpu.nvlink_gbs[1]),
                      allreduce_seconds(grad_bytes, 8, gpu.nvlink_gbs[0]))
            step = (per[0] * JOB.batch_size / 8 + reduce[0], per[1] * JOB.batch_size / 8 + reduce[1])
            rows.append([TITLES[kind], gpu.name, f"{w.train_sample() / 1e12:.0f}",
                         f"{w.train_sample() / w.forward:.2f}", fmt_range(per), fmt_range(reduce, 4),
                         fmt_range(step)])
    say(table(["model", "GPU", "TFLOP per sample", "x forward", "s per sample per GPU",
               "LoRA grad all-reduce s (8 ranks)", f"step s (batch {JOB.batch_size} on 8 GPUs)"], rows))

    say("\n### Weight sync: theta_old's LoRA tensors, learner rank 0 -> rollout actors (one flat broadcast)\n")
    rows = []
    for kind in KINDS:
        for wire, label in ((2, "bf16"), (4, "fp32")):
            nbytes = lora_sync_bytes(kind, wire)
            cells = [TITLES[kind], label, f"{nbytes / 1e6:.0f}"]
            for gpu in GPUS:
                cells.append(fmt_range((nbytes / gpu.nvlink_gbs[1] / 1e9 * 1e3, nbytes / gpu.nvlink_gbs[0] / 1e9
                                        * 1e3), 1))
            cells.append(fmt_range((nbytes / INTER_NODE_GBS[1] / 1e6, nbytes / INTER_NODE_GBS[0] / 1e6), 0))
            cells.append(fmt_range((nbytes / OBJECT_STORE_GBS[1] / 1e6, nbytes / OBJECT_STORE_GBS[0] / 1e6), 0))
            rows.append(cells)
    say(table(["model", "wire", "MB", *(f"{g.name} NVLink ms" for g in GPUS), "inter-node ms", "Ray object store ms"],
              rows))
    for kind in KINDS:
        gb = experience_bytes(kind) / 1e9
        network = fmt_range((gb / INTER_NODE_GBS[1], gb / INTER_NODE_GBS[0]), 2)
        store = fmt_range((gb / OBJECT_STORE_GBS[1], gb / OBJECT_STORE_GBS[0]), 1)
        say(f"\n{TITLES[kind]}: an epoch's experience (latents, prompt hidden states, condition latents, bf16) is "
            f"{gb:.2f} GB: {network} s between nodes, {store} s through the object store.")

    say(f"\n### The job: {JOB.tasks} tasks, {JOB.prompts:,} prompts, {JOB.prompts_per_epoch} prompts x K = "
        f"{JOB.group_size} = {JOB.images_per_epoch} images per epoch, {JOB.epochs} epochs\n")
    rows = []
    for steps in JOB.steps:
        for kind in KINDS:
            for gpu in GPUS:
                for nodes in JOB.nodes:
                    p = plan(kind, gpu, nodes, steps)
                    both, score = p.colocated
                    colocated = (f"{duration_range(p.colocated_s)} (batch {p.colocated_batch})" if p.colocated_batch
                                 else "does not fit")
                    rows.append([steps, TITLES[kind], gpu.name, p.gpus, f"{both} + {score}", colocated,
                                 " / ".join(map(str, p.split)), duration_range(p.off_policy_s),
                                 duration_range(p.sync_s), duration_range(p.job_s(JOB.epochs))])
    say(table(["steps", "model", "GPU", "GPUs", "colocated: sample+train / score", "colocated epoch (rollout batch)",
               "disaggregated: sample / train / score", "off-policy epoch", "sync epoch",
               f"{JOB.epochs} epochs (faster layout)"], rows))
    per_pass = JOB.prompts / JOB.prompts_per_epoch
    say(f"\nOne pass over the {JOB.prompts:,}-prompt pool is {per_pass:.1f} epochs "
        f"({JOB.prompts * JOB.group_size:,} images); {JOB.epochs} epochs see each prompt "
        f"{JOB.epochs / per_pass:.1f} times.")
    say(f"\n(computed in {time.perf_counter() - started:.0f} s)")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--no-flop-check", action="store_true", help="skip the FlopCounterMode cross-check")
    args = parser.parse_args(argv)
    print(report(check_flops=not args.no_flop_check))


if __name__ == "__main__":
    main()
