"""Tiny local checkpoints of the real edit architectures: FLUX.1 Kontext and Qwen-Image-Edit at toy size.

`make_tiny(kind, out, seed)` writes a diffusers pipeline folder (model_index.json and one folder per component,
the layout of a downloaded black-forest-labs/FLUX.1-Kontext-dev or Qwen/Qwen-Image-Edit) with random weights,
built from config in code as diffusers' own pipeline tests build theirs: nothing is downloaded, and
`FluxKontextPipeline.from_pretrained(out)` / `QwenImageEditPipeline.from_pretrained(out)` load it.

Every component is the released model's class with the released model's interface sizes where they cost
nothing (16 latent channels, the VAEs' 8x downsampling, 2 x 2 latent packing, the schedulers' configs) and
toy widths and depths elsewhere. The tokenizers are the real classes (CLIPTokenizer, T5Tokenizer,
Qwen2Tokenizer) with small vocabularies learned here, deterministically, from the project's instructions and
the Qwen-Image-Edit prompt template. The seed sets the weights; the same seed writes the same bytes.

Qwen2VLProcessor cannot be built without torchvision (transformers checks its video processor's class
even when it is None), and no torchvision runs beside this project's CPU torch. The folder is written as
the real one is laid out (processor/ holds the tokenizer, preprocessor_config.json and
video_preprocessor_config.json), so where torchvision is installed `from_pretrained(out)` loads the real
Qwen2VLProcessor; without it, pass `processor=image_only_processor(out)`: the same class's code, minus the
video processor that image edits never use.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2VLProcessor

from posterrl.errors import UserError
from posterrl.files import replace_dir, staging_dir
from posterrl.names import PIPELINE_MODEL_KINDS

# What the pipelines read from the tokenizers (FLUX: CLIP's 77 positions, T5's 512-token prompts).
CLIP_MAX_LENGTH, T5_MAX_LENGTH = 77, 512
# Qwen2.5-VL's special tokens in their released order (ids 151643..151656 there, 0.. here).
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# The Qwen processor's image budget. The pipeline hands the VLM its 1024 x 1024 condition image; the real
# processor keeps up to 12.8 M pixels (74 x 74 patches); this one scales it to 112 x 112 px (8 x 8 patches,
# 16 image tokens after the 2 x 2 merge). Multiples of patch (14) x merge (2).
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 112 * 112


# ---------------------------------------------------------------- tokenizers, learned in code


def _corpus() -> list[str]:
    """Instructions of the six tasks, the Qwen-Image-Edit prompt template (special tokens left out), digits,
    and every printable ASCII character as a word of its own, so that ASCII text has no unknown tokens."""
    from posterrl.data.tasks import INSTRUCTIONS, TASKS

    template = qwen_prompt_template()[0]
    for token in QWEN_SPECIAL_TOKENS:
        template = template.replace(token, "")
    lines = [t for templates in INSTRUCTIONS.values() for t in templates] + list(TASKS)
    return [*lines, template, "A poster with a bold title, a photo and a short caption.", "0 1 2 3 4 5 6 7 8 9",
            " ".join(chr(c) for c in range(33, 127))]


def qwen_prompt_template() -> tuple[str, int]:
    """QwenImageEditPipeline's prompt template and the number of leading tokens it drops from the encoder's
    hidden states (the system prompt), read from the pipeline itself so they follow diffusers' version."""
    from diffusers import QwenImageEditPipeline

    empty = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                  transformer=None)
    return empty.prompt_template_encode, empty.prompt_template_encode_start_idx


def _words(tokenizer, lines: list[str]) -> Counter[str]:
    """The corpus as `tokenizer` splits it before its model runs (normalizer, then pre-tokenizer), counted."""
    backend = tokenizer.backend_tokenizer
    counts: Counter[str] = Counter()
    for line in lines:
        text = backend.normalizer.normalize_str(line) if backend.normalizer else line
        counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return counts


def _learn_bpe(words: Counter[str], suffix: str = "") -> list[tuple[str, str]]:
    """BPE merges that build every corpus word into one token: the most frequent adjacent pair first, ties by
    the pair's text. Plain Python on purpose: the `tokenizers` trainers break ties by hash order and sum in
    parallel, so their vocabularies differ from run to run (seen for CLIP's BPE and T5's Unigram)."""
    def split(word: str) -> tuple[str, ...]:
        return (*word[:-1], word[-1] + suffix)

    segmented: Counter[tuple[str, ...]] = Counter()
    for word, count in words.items():
        segmented[split(word)] += count
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in segmented.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in segmented.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        segmented = merged


def _bpe_vocab(alphabet: list[str], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    """Token -> id in the released files' order: the alphabet, the merged tokens in merge order, the specials."""
    tokens = [*alphabet, *(a + b for a, b in merges), *specials]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _clip_tokenizer():
    """CLIP's byte-level BPE (lower-cased words ending in </w>), 77 positions as FLUX reads it."""
    from transformers import CLIPTokenizer

    merges = _learn_bpe(_words(CLIPTokenizer(), _corpus()), suffix="</w>")
    alphabet = _byte_alphabet()
    vocab = _bpe_vocab([*alphabet, *(c + "</w>" for c in alphabet)], merges, ["<|startoftext|>", "<|endoftext|>"])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _qwen_tokenizer():
    """Qwen2's byte-level BPE with the Qwen2.5-VL special tokens after the vocabulary, as released."""
    from transformers import Qwen2Tokenizer

    merges = _learn_bpe(_words(Qwen2Tokenizer(), _corpus()))
    vocab = _bpe_vocab(_byte_alphabet(), merges, QWEN_SPECIAL_TOKENS[:1])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=8192)  # the text model's positions
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    return tokenizer


def _t5_tokenizer():
    """T5's SentencePiece-style Unigram model (pad 0, eos 1, unk 2, then pieces by score), no sentinel tokens:
    every corpus word is a piece scored by its log frequency, and "▁" and each printable ASCII character a
    piece scored below every word, so other text falls apart into characters."""
    from transformers import T5Tokenizer

    words = _words(T5Tokenizer(extra_ids=0), _corpus())
    total = sum(words.values())
    pieces = [(word, math.log(count / total)) for word, count in words.items()]
    floor = math.log(1 / total) - 1.0
    pieces += [(char, floor) for char in ["▁", *(chr(c) for c in range(33, 127))] if char not in words]
    pieces.sort(key=lambda piece: (-piece[1], piece[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


# ---------------------------------------------------------------- the Qwen processor without torchvision


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor: the class transformers offers needs torchvision for
    that part alone. Text and images go through the inherited code unchanged."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def image_only_processor(directory: str | Path) -> ImageOnlyQwen2VLProcessor:
    """The processor of a Qwen-Image-Edit folder (its processor/ subfolder or the folder itself), video aside."""
    from transformers import AutoImageProcessor, AutoTokenizer

    directory = Path(directory)
    if (directory / "processor").is_dir():
        directory = directory / "processor"
    return ImageOnlyQwen2VLProcessor(AutoImageProcessor.from_pretrained(directory),
                                     AutoTokenizer.from_pretrained(directory))


def _save_qwen_processor(processor: Qwen2VLProcessor, directory: Path) -> None:
    """The released layout of processor/: the tokenizer's files, preprocessor_config.json (images) and
    video_preprocessor_config.json (videos), each naming Qwen2VLProcessor as its processor."""
    def update(file: str, **changes: str) -> None:
        config = json.loads((directory / file).read_text())
        (directory / file).write_text(json.dumps({**config, **changes}, indent=2, sort_keys=True) + "\n")

    directory.mkdir(parents=True)
    processor.tokenizer.save_pretrained(directory)
    update("tokenizer_config.json", processor_class="Qwen2VLProcessor")
    image = processor.image_processor
    image.save_pretrained(directory)
    # The released file's names: "Qwen2VLImageProcessor" loads the PIL or the torchvision backend, whichever is there.
    update("preprocessor_config.json", image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor")
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor",
             "patch_size": image.patch_size, "temporal_patch_size": image.temporal_patch_size,
             "merge_size": image.merge_size, "size": dict(image.size), "do_resize": True, "do_rescale": True,
             "do_normalize": True, "do_convert_rgb": True, "image_mean": list(image.image_mean),
             "image_std": list(image.image_std)}
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- components


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """build() with the global torch RNG at `seed` and restored afterwards: each component's weights depend
    on the seed alone, not on what was built before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def flux_kontext_components(seed: int = 0) -> dict[str, Any]:
    """FluxKontextPipeline's components at tiny size (the released model's sizes in the comments)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    clip = CLIPTextConfig(  # CLIP ViT-L/14's text tower: 768 wide, 12 layers
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t5 = T5Config(  # T5 v1.1 XXL's encoder: d_model 4096, 24 layers, 64 heads
        vocab_size=len(tokenizer_2), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id)
    return {
        "transformer": _seeded(seed, lambda: FluxTransformer2DModel(
            patch_size=1,  # the pipeline packs 2 x 2 latent patches: 4 x 16 latent channels per token
            in_channels=64,
            num_layers=1,  # 19
            num_single_layers=2,  # 38
            attention_head_dim=16,  # 128
            num_attention_heads=2,  # 24
            joint_attention_dim=t5.d_model,  # 4096
            pooled_projection_dim=clip.hidden_size,  # 768
            guidance_embeds=True,  # Kontext [dev] is guidance-distilled
            axes_dims_rope=(4, 6, 6),  # (16, 56, 56): sums to the head dim
        )),
        "vae": _seeded(seed, lambda: AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),  # (128, 256, 512, 512): four blocks, 8x downsampling
            layers_per_block=1,  # 2
            norm_num_groups=8,  # 32
            latent_channels=16,
            use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.1159, scaling_factor=0.3611,  # the released VAE's
            sample_size=1024,
        )),
        "text_encoder": _seeded(seed, lambda: CLIPTextModel(clip)),
        "text_encoder_2": _seeded(seed, lambda: T5EncoderModel(t5)),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(  # the released scheduler config
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096),
        "image_encoder": None,
        "feature_extractor": None,
    }


def qwen_image_edit_components(seed: int = 0) -> dict[str, Any]:
    """QwenImageEditPipeline's components at tiny size (the released model's sizes in the comments)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = _qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text_hidden = 64  # Qwen2.5-VL-7B: 3584
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": 128,  # 18944
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,  # 28, 28, 4
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"],
                     # M-RoPE over (time, row, col): halves of the head dim 32 (128: [16, 24, 24])
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,  # 32, 1280, 3420, 16
                       "out_hidden_size": text_hidden, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    return {
        "transformer": _seeded(seed, lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 2 x 2 packed patches of 16 latent channels
            out_channels=16,
            num_layers=2,  # 60
            attention_head_dim=16,  # 128
            num_attention_heads=2,  # 24
            joint_attention_dim=text_hidden,  # 3584
            axes_dims_rope=(4, 6, 6),  # (16, 56, 56): sums to the head dim
        )),
        "vae": _seeded(seed, lambda: AutoencoderKLQwenImage(
            base_dim=8,  # 96
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,  # 2
            temperal_downsample=[False, True, True],  # 8x spatial downsampling; latents_mean/std: the released ones
        )),
        "text_encoder": _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config)),
        "tokenizer": tokenizer,
        "processor": ImageOnlyQwen2VLProcessor(image_processor, tokenizer),
        "scheduler": FlowMatchEulerDiscreteScheduler(  # Qwen-Image's released scheduler config
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"),
    }


# kind -> (the diffusers pipeline class's name, its components at tiny size); one entry per PIPELINE_MODEL_KINDS.
BUILDERS: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "flux_kontext": ("FluxKontextPipeline", flux_kontext_components),
    "qwen_image_edit": ("QwenImageEditPipeline", qwen_image_edit_components),
}


# ---------------------------------------------------------------- writing the folder


def _library_and_class(component: Any) -> tuple[str, str]:
    """model_index.json's [library, class] of a component: the first class in its MRO that diffusers or
    transformers exports (ImageOnlyQwen2VLProcessor is saved, and loads, as Qwen2VLProcessor)."""
    for cls in type(component).__mro__:
        library = cls.__module__.split(".")[0]
        if library in ("diffusers", "transformers"):
            return library, cls.__name__
    raise TypeError(f"{type(component).__name__} is not a diffusers or transformers class")


def save_pipeline(pipeline_class: str, components: dict[str, Any], directory: Path) -> None:
    """What DiffusionPipeline.save_pretrained writes (model_index.json, one save_pretrained folder per
    component, safetensors weights), with the Qwen processor in its released layout."""
    import diffusers

    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    for name, component in sorted(components.items()):
        if component is None:
            index[name] = [None, None]
            continue
        index[name] = list(_library_and_class(component))
        if isinstance(component, Qwen2VLProcessor):
            _save_qwen_processor(component, directory / name)
        else:
            component.save_pretrained(directory / name)
    (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty `out` unless `force`, or a file in its place."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a directory to write the pipeline into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: the directory is not empty; pass --force to replace what is in it, "
                        "or name a new or empty directory")


def make_tiny(kind: str, out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny pipeline of `kind` to `out`, whole or not at all (built in `<out>.tmp`, moved in at
    the end); a non-empty `out` is replaced only with `force`. Same seed, same bytes."""
    if kind not in BUILDERS:
        raise UserError(f"--kind {kind!r}: expected one of {', '.join(PIPELINE_MODEL_KINDS)}")
    out = Path(out)
    check_out_dir(out, force)
    pipeline_class, build = BUILDERS[kind]
    components = build(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        save_pipeline(pipeline_class, components, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out)


def parameter_counts(directory: str | Path) -> dict[str, int]:
    """Parameters per model component of a pipeline folder, read from its safetensors headers."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for weights in sorted(Path(directory).glob("*/*.safetensors")):
        with safe_open(weights, framework="pt") as f:
            count = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
        counts[weights.parent.name] = counts.get(weights.parent.name, 0) + count
    return counts
