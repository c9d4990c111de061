"""Qwen-Image-Edit as a trainable posterrl policy (posterrl/models/qwen_policy.py) on a tiny make-tiny folder: LoRA
adapters are the policy state, an export loads into plain diffusers' QwenImageEditPipeline.load_lora_weights and
samples what posterrl's sampler samples with it, and N input canvases become one tall condition image."""

import numpy as np
import pytest
import torch
from PIL import Image

from posterrl.config import ModelConfig
from posterrl.flow import SamplerConfig
from posterrl.models import tiny_pipelines
from posterrl.models.pipeline_policy import LORA_FILE
from posterrl.policies import build_policy, load_policy
from posterrl.policy import quiet_model_libraries
from rollout.sampler import sample_groups

SIZE, STEPS = 32, 2
PROMPT = "Make the title bold"
TOLERANCE = 1e-5  # float32 on the CPU: the same operations as the pipeline; measured 0 (see the test's print)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    quiet_model_libraries()
    return tiny_pipelines.make_tiny("qwen_image_edit", tmp_path_factory.mktemp("qwen") / "qwen_image_edit", seed=0)


def model_config(qwen_dir, **changes) -> ModelConfig:
    return ModelConfig.model_validate({"kind": "qwen_image_edit", "pretrained_path": str(qwen_dir),
                                       "resolution": SIZE, "lora": {"rank": 4}} | changes)


def test_adapters_are_the_state_and_inputs_are_one_tall_condition(qwen_dir):
    policy = build_policy(model_config(qwen_dir)).eval()
    state = policy.policy_state()
    assert state and all(".lora_" in k for k in state)
    assert set(state) == {n for n, p in policy.named_parameters() if p.requires_grad}
    inputs = torch.rand(2, 3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1  # N = 3
    text, mask, refs = policy.prepare([PROMPT, "Fill the gap"], inputs)
    assert refs.shape == (2, 3 * 4, 64) and text.shape[:2] == mask.shape  # 3 canvases of 2 x 2 tokens
    out = sample_groups(policy, [PROMPT, "Fill the gap"], inputs, [1, 2], 2, SamplerConfig(num_steps=STEPS))
    assert out.images.shape == (2, 2, 3, SIZE, SIZE) and out.latents is not None
    assert out.latents.shape == (2, 2, 4, 64)
    # the pipeline's grid ends at its shift_terminal, then 0
    assert out.sigmas[0] == 1 and out.sigmas[-2] == pytest.approx(0.02) and out.sigmas[-1] == 0


def test_export_loads_into_the_plain_pipeline_and_samples_the_same(qwen_dir, tmp_path):
    from diffusers import QwenImageEditPipeline

    policy = build_policy(model_config(qwen_dir))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    export = policy.save_pretrained(tmp_path / "export")
    assert (export / LORA_FILE).is_file() and not (export / "transformer").exists()
    loaded = load_policy(export)
    assert all(torch.equal(loaded.policy_state()[k], v) for k, v in policy.policy_state().items())

    # the pipeline sizes the condition itself (about 1 Mpx): posterrl's model does the same with condition_size None
    model = loaded.model
    model.condition_size = None
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    noise = torch.randn(1, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = model.sample(model.encode_prompt([PROMPT], [image]), model.encode_reference(model.preprocess([image])),
                        SIZE, SIZE, num_steps=STEPS, noise=noise, decode=False).latents

    pipe = QwenImageEditPipeline.from_pretrained(qwen_dir, processor=tiny_pipelines.image_only_processor(qwen_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(export)
    theirs = pipe(image=image, prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  latents=noise.clone(), output_type="latent").images
    difference = float((ours - theirs).abs().max())
    print(f"\nexported LoRA in QwenImageEditPipeline vs posterrl's sampler: max |latents diff| {difference:.3g}")
    assert difference < TOLERANCE
    pipe.unload_lora_weights()
    plain = pipe(image=image, prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                 latents=noise.clone(), output_type="latent").images
    assert float((plain - theirs).abs().max()) > 100 * TOLERANCE  # the adapters took effect in the pipeline
