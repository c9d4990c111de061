"""A tiny Qwen2-VL or Qwen2.5-VL built from config, with a byte-level BPE tokenizer trained in code, and
the chat encoding every VLM scorer shares.

Nothing can be downloaded here, so tests, the tiny default and the vLLM server test use these models;
real runs load Qwen2-VL / Qwen2.5-VL from a local path through the same classes and the same
`encode_chat`. The sizes satisfy vLLM's CPU attention (head_dim 64) so the saved directory can
be served by `vllm serve` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat format: images become <|vision_start|><|image_pad|><|vision_end|>, and the image
# processor's grid decides how many <|image_pad|> tokens each one expands to.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def _corpus() -> list[str]:
    from posterrl.data.tasks import INSTRUCTIONS, TASKS

    lines = [t for templates in INSTRUCTIONS.values() for t in templates] + list(TASKS)
    lines += ["Rate the edit from 0 to 5. Answer with one digit.", "0 1 2 3 4 5 6 7 8 9",
              "input image output image instruction task score poster title layout style"]
    return lines * 4


def build_tokenizer():
    """Byte-level BPE with digits as single tokens and the Qwen2-VL special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# family -> (config class, model class, the vision tower's sizes beyond those the families share).
# Qwen2-VL's vision tower is `embed_dim` wide and merges into `hidden_size` (the text width); Qwen2.5-VL's is
# `hidden_size` wide with a gated MLP, merges into `out_hidden_size`, and attends within windows of
# `window_size` pixels (56: 2 x 2 merged patches) except in the `fullatt_block_indexes` blocks.
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
                 {"embed_dim": 64, "hidden_size": 128, "mlp_ratio": 2}),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                   {"hidden_size": 64, "intermediate_size": 128, "out_hidden_size": 128, "window_size": 56,
                    "fullatt_block_indexes": [1]}),
}


def build_tiny_vlm(directory: str | Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Model, tokenizer and image processor of a tiny Qwen2-VL or Qwen2.5-VL (`family`), saved so
    `AutoModelForImageTextToText`, `AutoTokenizer` and `AutoImageProcessor.from_pretrained(directory)` work.

    Both families share the tokenizer, the chat template, the text model (hidden 128, 2 heads of 64, 2 layers,
    M-RoPE sections (8, 12, 12) over the head dim's 32 rotary pairs) and the vision patching (patch 14, merge 2).
    """
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    if family not in FAMILIES:
        raise ValueError(f"tiny VLM: unknown family {family!r} (expected one of {sorted(FAMILIES)})")
    config_class, model_class, vision_sizes = FAMILIES[family]
    directory = Path(directory)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = getattr(transformers, config_class)(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}},
        vision_config={"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, **vision_sizes},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(directory)
    return directory


def build_tiny_qwen2_vl(directory: str | Path, seed: int = 0) -> Path:
    """The tiny Qwen2-VL (`build_tiny_vlm(directory, "qwen2_vl", seed)`)."""
    return build_tiny_vlm(directory, "qwen2_vl", seed)


def encode_chat(tokenizer, image_processor, conversations: Sequence[list[dict]],
                images: Sequence[Sequence[Image.Image]]) -> dict[str, torch.Tensor]:
    """A batch of chats (with images in order of appearance) as Qwen2-VL / Qwen2.5-VL inputs, padded on the left.

    Stands in for Qwen2VLProcessor, which imports torchvision (no torchvision loads beside this torch):
    the same steps — chat template, image grids, one <|image_pad|> per merged patch — without it.
    Left padding puts every row's last real token at position -1, where a reward head or the next-token
    distribution is read. Returns input_ids, attention_mask (B, T), pixel_values (patches, dim),
    image_grid_thw (images, 3) and mm_token_type_ids (B, T): M-RoPE needs the last (Qwen2-VL raises without
    it; Qwen2.5-VL silently falls back to 1-D positions). Qwen2.5-VL's other extra input, second_per_grid_ts,
    is for videos only.
    """
    pad_token = "<|image_pad|>"
    flat_images = [image.convert("RGB") for row in images for image in row]
    vision = image_processor(images=flat_images, return_tensors="pt") if flat_images else {}
    merge = image_processor.merge_size**2
    counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist()) if flat_images else iter(())
    texts = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        pieces = text.split(pad_token)
        text = pieces[0] + "".join(pad_token * next(counts) + piece for piece in pieces[1:])
        texts.append(text)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    image_token_id = tokenizer.convert_tokens_to_ids(pad_token)
    out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
           "mm_token_type_ids": (encoded["input_ids"] == image_token_id).int()}
    if flat_images:
        out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
    return out
