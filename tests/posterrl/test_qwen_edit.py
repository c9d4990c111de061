"""posterrl's Qwen-Image-Edit sampler (posterrl/models/qwen_edit.py) against plain diffusers' QwenImageEditPipeline
on one tiny make-tiny folder: the same seed, steps, input image(s) and prompt(s) give the same latents and images
(float32, CPU), with and without true CFG; one velocity + Euler step is one pipeline step; prompt encodings are
the pipeline's, and cached rows do not depend on the batch.

The pipeline scales every condition image to about 1024 x 1024 (4096 condition tokens; the VAE encode of one
such image takes about 2.6 s here), so pipeline runs are shared across tests (`pipe_run`)."""

import importlib.util
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from posterrl.models import tiny_pipelines
from posterrl.models.qwen_edit import QwenEditModel, calculate_dimensions
from posterrl.policy import quiet_model_libraries

SIZE, STEPS, SEED, CFG_SCALE = 32, 2, 0, 4.0
PROMPTS = ["Make the title bold", "Move the photo to the left"]  # different lengths: padding in a batch
NEGATIVE = " "  # the released examples' negative prompt
# Batch 1: one 32 x 32 PIL image, the pipeline's documented path: measured difference 0. Batch 2: the per-sample
# prompt encoding (what makes cached rows batch-independent) differs from the pipeline's batched text-encoder call
# by float32 round-off (7e-7 measured), which reaches the latents as about 4e-7. The bound leaves room for another
# BLAS or thread count.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    quiet_model_libraries()
    return tiny_pipelines.make_tiny("qwen_image_edit", tmp_path_factory.mktemp("qwen") / "qwen_image_edit", seed=0)


@pytest.fixture(scope="module")
def model(qwen_dir):
    return QwenEditModel.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    from diffusers import QwenImageEditPipeline

    if importlib.util.find_spec("torchvision") is None:  # see docs/real_models.md: the processor needs torchvision
        processor = tiny_pipelines.image_only_processor(qwen_dir)
        pipeline = QwenImageEditPipeline.from_pretrained(qwen_dir, processor=processor)
    else:
        pipeline = QwenImageEditPipeline.from_pretrained(qwen_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def random_image(side: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def inputs(batch: int) -> tuple[list[str], list[Image.Image], Image.Image | list[Image.Image]]:
    """(prompts, our images, the pipeline's `image=`). Batch 1: a 32 x 32 image, given to the pipeline as one PIL
    image. Batch 2 needs a list, and the pipeline resizes a list for its VAE but hands it to Qwen2.5-VL unresized
    (VaeImageProcessor.resize leaves lists alone; test_pipeline_list_images_reach_the_vlm_unresized), so the two
    images are already at the condition size, 1024 x 1024, where both paths see the same pixels."""
    if batch == 1:
        image = random_image(SIZE, 1)
        return PROMPTS[:1], [image], image
    images = [random_image(1024, 1), random_image(1024, 2)]
    return PROMPTS, images, images


@pytest.fixture(scope="module")
def references(model):
    """Batch size -> the condition latents of `inputs(batch)` (VAE encodes at 1024 x 1024, done once)."""
    cache = {}

    def get(batch: int):
        if batch not in cache:
            cache[batch] = model.encode_reference(model.preprocess(inputs(batch)[1]))
        return cache[batch]

    return get


@pytest.fixture(scope="module")
def pipe_run(pipe):
    """(batch, output_type, cfg) -> (the pipeline's images, the latents after each step), each run once."""
    cache = {}

    def get(batch: int, output_type: str, cfg: bool = False):
        key = (batch, output_type, cfg)
        if key not in cache:
            prompts, _, image = inputs(batch)
            steps: list[torch.Tensor] = []

            def keep(pipeline, i, t, kwargs):
                steps.append(kwargs["latents"].clone())
                return {}

            extra = {"negative_prompt": [NEGATIVE] * batch, "true_cfg_scale": CFG_SCALE} if cfg else {}
            images = pipe(image=image, prompt=prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                          generator=torch.Generator().manual_seed(SEED), output_type=output_type,
                          callback_on_step_end=keep, **extra).images
            cache[key] = (images, steps)
        return cache[key]

    return get


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "batch2"])
def test_sample_equals_the_pipeline(model, pipe, references, pipe_run, batch):
    prompts, images, _ = inputs(batch)
    reference = references(batch)  # (B, 4096, 64)
    start = time.perf_counter()
    out = model.sample(model.encode_prompt(prompts, images), reference, SIZE, SIZE, num_steps=STEPS,
                       generator=torch.Generator().manual_seed(SEED))
    ours = time.perf_counter() - start
    assert reference.tokens.shape == (batch, 64 * 64, 64) and reference.grid == (64, 64)
    assert out.latents.shape == (batch, (SIZE // 16) ** 2, 64)
    assert out.images is not None and out.images.shape == (batch, 3, SIZE, SIZE)

    latents, _ = pipe_run(batch, "latent")
    pipe_images, _ = pipe_run(batch, "np")
    assert torch.equal(out.timesteps, pipe.scheduler.timesteps)
    assert torch.equal(out.sigmas, pipe.scheduler.sigmas)
    assert float(out.sigmas[-2]) == pytest.approx(0.02)  # the scheduler's shift_terminal, then the terminal 0
    latent_diff, image_diff = max_diff(out.latents, latents), max_diff(model.to_numpy(out.images), pipe_images)
    print(f"\n{batch} prompt(s), {STEPS} steps: max |latents diff| {latent_diff:.3g}, "
          f"max |image diff| {image_diff:.3g}; posterrl sample {ours:.2f} s (condition encoded before)")
    assert latent_diff < TOLERANCE and image_diff < TOLERANCE
    if batch == 2:  # two prompts, two different edits
        assert max_diff(out.latents[0], out.latents[1]) > 1e-3


def test_batch2_with_the_pipeline_given_our_prompt_embeddings_is_exact(model, pipe, references):
    """The batch-2 difference above is the prompt encoding's alone: handed posterrl's embeddings and mask (a padded
    batch, so the transformer's masked attention path), the pipeline's latents are posterrl's exactly."""
    prompts, images, image = inputs(2)
    prompt = model.encode_prompt(prompts, images)
    assert prompt.transformer_mask() is not None
    ours = model.sample(prompt, references(2), SIZE, SIZE, num_steps=STEPS, decode=False,
                        generator=torch.Generator().manual_seed(SEED))
    latents = pipe(image=image, prompt_embeds=prompt.text, prompt_embeds_mask=prompt.mask, height=SIZE, width=SIZE,
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                   output_type="latent").images
    diff = max_diff(ours.latents, latents)
    print(f"\nbatch 2, the same prompt embeddings: max |latents diff| {diff:.3g}")
    assert diff < TOLERANCE


def test_true_cfg_equals_the_pipeline(model, references, pipe_run):
    prompts, images, _ = inputs(1)
    prompt, negative = model.encode_prompt(prompts, images), model.encode_prompt([NEGATIVE], images)
    generator = torch.Generator().manual_seed(SEED)
    guided = model.sample(prompt, references(1), SIZE, SIZE, num_steps=STEPS, generator=generator, decode=False,
                          negative=negative, true_cfg_scale=CFG_SCALE)
    latents, _ = pipe_run(1, "latent", cfg=True)
    diff = max_diff(guided.latents, latents)
    print(f"\ntrue CFG {CFG_SCALE}, negative {NEGATIVE!r}: max |latents diff| {diff:.3g}")
    assert diff < TOLERANCE
    assert max_diff(guided.latents, pipe_run(1, "latent")[0]) > 1e-3  # guidance changes the edit
    with pytest.raises(ValueError, match="negative prompt"):
        model.sample(prompt, references(1), SIZE, SIZE, num_steps=STEPS, true_cfg_scale=CFG_SCALE)


def test_velocity_and_euler_step_are_one_pipeline_step(model, references, pipe_run):
    _, steps = pipe_run(1, "latent")
    prompts, images, _ = inputs(1)
    noise = model.initial_noise(1, SIZE, SIZE, torch.Generator().manual_seed(SEED))  # the pipeline's start noise
    prompt = model.encode_prompt(prompts, images)
    sigmas, timesteps = model.time_grid(STEPS, noise.shape[1])
    with torch.no_grad():
        v = model.velocity(noise, timesteps[:1] / 1000, prompt, references(1))
        no_reference = model.velocity(noise, timesteps[:1] / 1000, prompt, None)
    step = model.euler_step(noise, v, sigmas[0], sigmas[1])
    diff = max_diff(step, steps[0])
    print(f"\none step: max |diff| {diff:.3g}")
    assert diff < TOLERANCE
    assert v.shape == noise.shape
    assert max_diff(v, no_reference) > 1e-6  # the condition tokens are an input


def test_velocity_keeps_the_transformer_graph_and_small_conditions(model):
    """The condition at a caller's size (posterrl's small canvases; not something the pipeline does): 32 x 32 px
    is 2 x 2 condition tokens, and both the VAE and Qwen2.5-VL see the image at that size."""
    image = random_image(SIZE, 1)
    condition = model.preprocess([image], size=(SIZE, SIZE))  # (1, 3, 32, 32)
    assert condition.shape == (1, 3, SIZE, SIZE)
    reference = model.encode_reference(condition)
    assert reference.tokens.shape == (1, 4, 64) and reference.grid == (2, 2)
    prompt = model.encode_prompt(PROMPTS[:1], [image], size=(SIZE, SIZE), use_cache=False)
    noise = model.initial_noise(1, SIZE, SIZE, torch.Generator().manual_seed(SEED))
    v = model.velocity(noise, torch.tensor([0.5]), prompt, reference)
    v.square().mean().backward()
    no_grad = {name for name, p in model.transformer.named_parameters() if p.requires_grad and p.grad is None}
    # The last block's text-stream output (its attention's text projection and text MLP) feeds nothing: only the
    # image tokens leave the transformer. Everything else gets a gradient.
    last = len(model.transformer.transformer_blocks) - 1
    assert no_grad == {f"transformer_blocks.{last}.{name}" for name in (
        "attn.to_add_out.weight", "attn.to_add_out.bias", "txt_mlp.net.0.proj.weight", "txt_mlp.net.0.proj.bias",
        "txt_mlp.net.2.weight", "txt_mlp.net.2.bias")}
    assert not prompt.text.requires_grad and not reference.tokens.requires_grad  # frozen conditioning
    model.transformer.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.preprocess([image], size=(40, 32))


def test_condition_sizing_is_the_pipeline_s(model):
    wide = Image.new("RGB", (300, 200))
    height, width = calculate_dimensions(1024 * 1024, 300 / 200)
    assert (height, width) == (832, 1248)  # the pipeline's calculate_dimensions returns (1248, 832, None)
    assert model.condition_hw(wide) == (height, width)
    assert model.condition_hw(wide, size=(64, 96)) == (64, 96)


def test_pipeline_list_images_reach_the_vlm_unresized(pipe):
    """Why batch 2 uses 1024 x 1024 inputs: the pipeline resizes a single PIL image for Qwen2.5-VL, a list not."""
    small = random_image(SIZE, 1)
    assert pipe.image_processor.resize(small, 1024, 1024).size == (1024, 1024)
    assert pipe.image_processor.resize([small], 1024, 1024)[0].size == (SIZE, SIZE)


def test_encode_prompt_equals_the_pipeline_and_cache(model, pipe):
    model.clear_prompt_cache()
    with torch.no_grad():
        prompts, images, image = inputs(1)  # one PIL image: the pipeline resizes it for the VLM, as we do
        text, mask = pipe.encode_prompt(prompts, image=pipe.image_processor.resize(image, 1024, 1024))
    ours = model.encode_prompt(prompts, images)
    assert mask is None and bool(ours.mask.all()) and ours.transformer_mask() is None  # nothing padded
    assert torch.equal(ours.text, text)

    prompts, images, _ = inputs(2)
    with torch.no_grad():
        text, mask = pipe.encode_prompt(prompts, image=images)  # one text-encoder call for both
    both = model.encode_prompt(prompts, images)  # one call each
    assert both.text.shape == (2, text.shape[1], model.text_encoder.config.text_config.hidden_size)
    assert torch.equal(both.mask, mask) and both.transformer_mask() is not None
    diff = max_diff(both.text, text)
    print(f"\nbatched (pipeline) vs per-sample (posterrl) prompt encoding: max |diff| {diff:.3g}")
    assert diff < TOLERANCE
    short = int(both.mask[0].sum())  # the first prompt's length; the second is the longest
    assert short < both.text.shape[1] and not both.text[0, short:].any()  # zero padding after the shorter prompt

    cached = model.encode_prompt(prompts[1:], images[1:])  # from the cache, alone in its batch
    fresh = model.encode_prompt(prompts[1:], images[1:], use_cache=False)
    assert torch.equal(cached.text, fresh.text) and torch.equal(cached.text[0], both.text[1])
    first = model.encode_prompt(prompts[:1], images[:1])  # alone: no padding, L = its own length
    assert first.text.shape[1] == short and torch.equal(first.text[0], both.text[0, :short])
    other_image = model.encode_prompt(prompts[:1], images[1:2])
    assert max_diff(other_image.text, first.text) > 1e-6  # the image is part of the key and of the encoding
    both.text.zero_()  # the caller's tensors are their own
    assert torch.equal(model.encode_prompt(prompts[:1], images[:1]).text, first.text)
    with pytest.raises(ValueError, match="one condition image per text"):
        model.encode_prompt(prompts, images[:1])

    small = QwenEditModel(model.transformer, model.vae, model.text_encoder, model.processor, model.scheduler_config,
                          prompt_cache_size=1)
    small.encode_prompt(prompts, images)
    assert [key[0] for key in small._prompt_cache] == prompts[1:]  # least recently used dropped


def test_from_pretrained_checks_the_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    with pytest.raises(ValueError, match="expected 'QwenImageEditPipeline'"):
        QwenEditModel.from_pretrained(tmp_path)
