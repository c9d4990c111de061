"""posterrl's FLUX.1 Kontext sampler (posterrl/models/kontext.py) against plain diffusers' FluxKontextPipeline on
one tiny make-tiny folder: the same seed, steps, guidance, input image and prompt give the same latents and
images (float32, CPU; measured max abs difference 0), one velocity + Euler step is one pipeline step, and
cached prompt encodings are the pipeline's."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from posterrl.models import tiny_pipelines
from posterrl.models.kontext import KontextEditModel, pack_latents, unpack_latents
from posterrl.policy import quiet_model_libraries

SIZE, STEPS, GUIDANCE, SEED = 32, 3, 2.5, 0
PROMPTS = ["Make the title bold", "Move the photo to the left"]
# float32 on the CPU: the same operations in the same order, so the differences measured are 0; the bound leaves
# room for another BLAS or thread count.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    quiet_model_libraries()
    return tiny_pipelines.make_tiny("flux_kontext", tmp_path_factory.mktemp("kontext") / "flux_kontext", seed=0)


@pytest.fixture(scope="module")
def model(kontext_dir):
    return KontextEditModel.from_pretrained(kontext_dir)


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    from diffusers import FluxKontextPipeline

    pipeline = FluxKontextPipeline.from_pretrained(kontext_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def input_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def run_pipe(pipe, prompts, output_type, **kwargs):
    return pipe(image=input_image(), prompt=prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), output_type=output_type,
                max_area=SIZE * SIZE, _auto_resize=False, **kwargs).images


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_pack_unpack_round_trip():
    z = torch.randn(2, 16, 4, 6)
    tokens = pack_latents(z)
    assert tokens.shape == (2, 2 * 3, 64)
    assert torch.equal(unpack_latents(tokens, 4, 6), z)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch2"])
def test_sample_equals_the_pipeline(model, pipe, prompts):
    start = time.perf_counter()
    reference = model.encode_reference(model.preprocess([input_image()]))  # (1, 4, 64)
    out = model.sample(model.encode_prompt(prompts), reference.repeat_interleave(len(prompts)), SIZE, SIZE,
                       num_steps=STEPS, guidance=GUIDANCE, generator=torch.Generator().manual_seed(SEED))
    ours = time.perf_counter() - start
    assert out.latents.shape == (len(prompts), (SIZE // 16) ** 2, 64)
    assert out.images is not None and out.images.shape == (len(prompts), 3, SIZE, SIZE)

    latents = run_pipe(pipe, prompts, "latent")
    images = run_pipe(pipe, prompts, "np")
    assert torch.equal(out.timesteps, pipe.scheduler.timesteps)
    assert torch.equal(out.sigmas, pipe.scheduler.sigmas)
    latent_diff, image_diff = max_diff(out.latents, latents), max_diff(model.to_numpy(out.images), images)
    print(f"\n{len(prompts)} prompt(s), {STEPS} steps: max |latents diff| {latent_diff:.3g}, "
          f"max |image diff| {image_diff:.3g}; posterrl sample {ours:.2f} s")
    assert latent_diff < TOLERANCE and image_diff < TOLERANCE
    if len(prompts) == 2:  # two prompts, two different edits
        assert max_diff(out.latents[0], out.latents[1]) > 1e-3


def test_velocity_and_euler_step_are_one_pipeline_step(model, pipe):
    after_first: dict[str, torch.Tensor] = {}

    def keep(pipeline, i, t, kwargs):
        if i == 0:
            after_first["latents"] = kwargs["latents"].clone()
        return {}

    run_pipe(pipe, PROMPTS[:1], "latent", callback_on_step_end=keep)
    noise = model.initial_noise(1, SIZE, SIZE, torch.Generator().manual_seed(SEED))  # the pipeline's start noise
    prompt = model.encode_prompt(PROMPTS[:1])
    reference = model.encode_reference(model.preprocess([input_image()]))
    sigmas, timesteps = model.time_grid(STEPS, noise.shape[1])
    with torch.no_grad():
        v = model.velocity(noise, timesteps[:1] / 1000, prompt.text, prompt.pooled, reference, GUIDANCE)
        other_guidance = model.velocity(noise, timesteps[:1] / 1000, prompt.text, prompt.pooled, reference, 5.0)
        no_reference = model.velocity(noise, timesteps[:1] / 1000, prompt.text, prompt.pooled, None, GUIDANCE)
    step = model.euler_step(noise, v, sigmas[0], sigmas[1])
    diff = max_diff(step, after_first["latents"])
    print(f"\none step: max |diff| {diff:.3g}")
    assert diff < TOLERANCE
    assert v.shape == noise.shape
    assert max_diff(v, other_guidance) > 1e-6  # the guidance embedding is an input
    assert max_diff(v, no_reference) > 1e-6  # and so are the condition tokens


def test_velocity_keeps_the_transformer_graph(model):
    prompt = model.encode_prompt(PROMPTS[:1])
    reference = model.encode_reference(model.preprocess([input_image()]))
    noise = model.initial_noise(1, SIZE, SIZE, torch.Generator().manual_seed(SEED))
    v = model.velocity(noise, torch.tensor([0.5]), prompt.text, prompt.pooled, reference)
    v.square().mean().backward()
    assert all(p.grad is not None for p in model.transformer.parameters() if p.requires_grad)
    assert not prompt.text.requires_grad and not reference.tokens.requires_grad  # frozen conditioning
    model.transformer.zero_grad(set_to_none=True)


def test_encode_prompt_cache(model, pipe):
    model.clear_prompt_cache()
    both = model.encode_prompt(PROMPTS)
    assert both.text.shape == (2, model.max_sequence_length, model.text_encoder_2.config.d_model)
    assert both.pooled.shape == (2, model.text_encoder.config.hidden_size)
    cached = model.encode_prompt(PROMPTS[1:])  # from the cache
    fresh = model.encode_prompt(PROMPTS[1:], use_cache=False)
    assert torch.equal(cached.text, fresh.text) and torch.equal(cached.pooled, fresh.pooled)
    assert torch.equal(cached.text[0], both.text[1]) and torch.equal(cached.pooled[0], both.pooled[1])
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt(prompt=PROMPTS[1:], prompt_2=None)
    assert torch.equal(cached.text, text) and torch.equal(cached.pooled, pooled)
    both.text.zero_()  # the caller's tensors are its own
    again = model.encode_prompt(PROMPTS[:1])
    assert torch.equal(again.text, model.encode_prompt(PROMPTS[:1], use_cache=False).text)
    assert again.text.abs().max() > 0

    small = KontextEditModel(model.transformer, model.vae, model.text_encoder, model.tokenizer, model.text_encoder_2,
                             model.tokenizer_2, model.scheduler_config, prompt_cache_size=1)
    small.encode_prompt(PROMPTS)
    assert list(small._prompt_cache) == PROMPTS[1:]  # least recently used dropped
