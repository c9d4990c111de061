"""FLUX.1 Kontext as a trainable posterrl policy (posterrl/models/kontext_policy.py) on a tiny make-tiny folder:
LoRA adapters are the only trained weights and the whole policy state, an export loads into plain diffusers'
FluxKontextPipeline.load_lora_weights and samples what posterrl samples, theta_old as a swapped-in state equals
a separate model, and a state of the wrong shape or keys is refused by name."""

import numpy as np
import pytest
import torch
from PIL import Image

from learner.tasks.base import velocity_with
from posterrl.config import ModelConfig
from posterrl.flow import SamplerConfig
from posterrl.models import tiny_pipelines
from posterrl.models.kontext_policy import KontextPolicy
from posterrl.models.pipeline_policy import LORA_FILE
from posterrl.policies import build_policy, load_policy
from posterrl.policy import quiet_model_libraries
from rollout.sampler import sample, sample_groups

SIZE, STEPS = 32, 3
PROMPT = "Make the title bold"
# posterrl feeds the transformer t = sigma, the pipeline timestep / 1000 (sigma * 1000 / 1000 in float32): the
# only difference, measured at 4.8e-7 on the latents (magnitude about 4).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    quiet_model_libraries()
    return tiny_pipelines.make_tiny("flux_kontext", tmp_path_factory.mktemp("kontext") / "flux_kontext", seed=0)


def model_config(kontext_dir, **changes) -> ModelConfig:
    settings = {"kind": "flux_kontext", "pretrained_path": str(kontext_dir), "resolution": SIZE,
                "text_encoder": {"max_length": 32}, "lora": {"rank": 4}} | changes
    return ModelConfig.model_validate(settings)


def perturb_adapters(policy: KontextPolicy, seed: int = 0) -> None:
    """As training would: move every trainable tensor (the adapters' B starts at 0, so the policy is the base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def canvases(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (B, 1, 3, R, R)


def test_lora_adapters_are_the_policy_state_and_the_only_trained_weights(kontext_dir):
    policy = build_policy(model_config(kontext_dir))
    state = policy.policy_state()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert set(state) == trainable and all(".lora_A." in k or ".lora_B." in k for k in state)
    # one A and one B per target module: 4 attention + 4 text-stream projections in the double block, 3 per single
    assert len(state) == 2 * (8 * 1 + 3 * 2)
    assert sum(v.numel() for v in state.values()) < 0.05 * sum(p.numel() for p in policy.parameters())

    policy.train()
    inputs = canvases()
    x0 = policy.encode_images(inputs[:, 0], inputs)  # (B, T, 64)
    assert x0.shape == (2, (SIZE // 16) ** 2, 64) == (2, *policy.latent_shape)
    base = {k: v.detach().clone() for k, v in policy.state_dict().items() if k not in state}
    adapters = {k: v.detach().clone() for k, v in state.items()}
    assert all(not v.any() for k, v in adapters.items() if ".lora_B." in k)  # B = 0: the policy starts as the base
    # Adam, as the learner: a step moves every tensor with a nonzero gradient by about lr, however small it is
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # B = 0 at the start: the first step moves B only, the second A too
        noise = torch.randn(x0.shape, generator=generator)
        v = policy(0.5 * x0 + 0.5 * noise, torch.full((2,), 0.5), *policy.prepare([PROMPT, "x"], inputs))
        optimizer.zero_grad()
        v.pow(2).mean().backward()
        optimizer.step()
    after = policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the frozen base did not move
    unmoved = [k for k, v in adapters.items() if torch.equal(after[k], v)]
    assert not unmoved, unmoved  # every adapter tensor did
    # the frozen conditioning stays in eval mode in a training module (T5 dropout would change cached prompts)
    assert policy.training and not policy.model.text_encoder_2.training and not policy.model.vae.training


def test_a_wrong_state_is_refused_by_name(kontext_dir):
    policy = build_policy(model_config(kontext_dir))
    state = policy.policy_state()
    missing = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match=r"flux_kontext policy state: 1 expected tensors missing \['model.transformer"):
        policy.load_policy_state(missing)
    other_rank = build_policy(model_config(kontext_dir, lora={"rank": 2})).policy_state()
    with pytest.raises(RuntimeError, match="size mismatch"):
        policy.load_policy_state(other_rank)
    with pytest.raises(ValueError, match="unexpected"):
        policy.load_policy_state({**state, "model.transformer.extra.weight": torch.zeros(1)})


def test_export_loads_into_the_plain_pipeline_and_samples_the_same(kontext_dir, tmp_path):
    from diffusers import FluxKontextPipeline

    policy = build_policy(model_config(kontext_dir))
    perturb_adapters(policy)
    export = policy.save_pretrained(tmp_path / "export")
    assert (export / LORA_FILE).is_file() and not (export / "transformer").exists()  # adapters only
    loaded = load_policy(export)
    assert all(torch.equal(loaded.policy_state()[k], v) for k, v in policy.policy_state().items())

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    reference = loaded.model.preprocess([image])  # (1, 3, R, R) as the pipeline prepares it
    noise = torch.randn(1, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = sample(loaded, loaded.condition(*loaded.prepare([PROMPT], reference[None])), noise,
                  SamplerConfig(num_steps=STEPS))

    pipe = FluxKontextPipeline.from_pretrained(kontext_dir)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(image=image, prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=2.5,
                 latents=noise.clone(), output_type="latent", max_area=SIZE * SIZE, _auto_resize=False,
                 max_sequence_length=32).images
    pipe.load_lora_weights(export)
    adapted = pipe(image=image, prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=2.5,
                   latents=noise.clone(), output_type="latent", max_area=SIZE * SIZE, _auto_resize=False,
                   max_sequence_length=32).images
    difference = float((ours - adapted).abs().max())
    print(f"\nexported LoRA in FluxKontextPipeline vs posterrl's sampler: max |latents diff| {difference:.3g}")
    assert difference < TOLERANCE
    assert float((adapted - plain).abs().max()) > 100 * TOLERANCE  # the adapters took effect in the pipeline


def test_theta_old_swapped_in_equals_a_separate_model(kontext_dir):
    policy = build_policy(model_config(kontext_dir))
    start = {k: v.detach().clone() for k, v in policy.policy_state().items()}  # theta_old = the starting adapters
    perturb_adapters(policy)
    separate = build_policy(model_config(kontext_dir), state=start).eval()
    policy.eval()
    inputs = canvases()
    prepared = policy.prepare([PROMPT, "Fill the gap"], inputs)
    x_t, t = torch.randn(2, *policy.latent_shape), torch.tensor([0.3, 0.8])
    assert torch.equal(velocity_with(policy, start, x_t, t, *prepared), separate(x_t, t, *prepared))
    assert not torch.equal(policy(x_t, t, *prepared), separate(x_t, t, *prepared))  # theta itself is untouched


def test_groups_sample_latents_for_training_and_images_for_rewards(kontext_dir):
    policy = build_policy(model_config(kontext_dir)).eval()
    out = sample_groups(policy, [PROMPT, "Fill the gap"], canvases(), [5, 6], 3, SamplerConfig(num_steps=2))
    assert out.images.shape == (2, 3, 3, SIZE, SIZE) and out.latents is not None
    assert out.latents.shape == (2, 3, *policy.latent_shape)
    assert out.images.min() >= -1 and out.images.max() <= 1
    assert torch.allclose(policy.decode_latents(out.latents[1], canvases()[1:].expand(3, -1, -1, -1, -1)),
                          out.images[1], atol=1e-5)  # batched convs differ
    # the pipeline's time grid: sigmas linspace(1, 1/S, S), shifted for the canvas' token count, then 0
    assert out.sigmas[0] == 1 and out.sigmas[-1] == 0 and len(out.sigmas) == 3


def test_full_fine_tuning_exports_the_transformer(kontext_dir, tmp_path):
    policy = build_policy(model_config(kontext_dir, lora={"rank": 0}))
    state = policy.policy_state()
    assert state and all(k.startswith("model.transformer.") for k in state)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if not n.startswith("model.transformer."))
    export = policy.save_pretrained(tmp_path / "full")
    assert (export / "transformer" / "config.json").is_file() and not (export / LORA_FILE).exists()
    loaded = load_policy(export)
    assert all(torch.equal(loaded.policy_state()[k], v) for k, v in state.items())


def test_target_latents_are_encoded_once_per_row_and_read_back(kontext_dir, tmp_path):
    from learner.latent_cache import TargetLatents
    from posterrl.batch import collate
    from posterrl.data.manifest import load_manifest, write_manifest
    from posterrl.data.tasks import TASKS, build_samples, write_samples

    written = write_samples(build_samples(0, seed=3, size=64, tasks=TASKS[:2], split="train"), tmp_path / "data")
    write_manifest(written, tmp_path / "data" / "manifest.jsonl")
    rows = load_manifest(tmp_path / "data" / "manifest.jsonl", require_target=True).rows
    policy = build_policy(model_config(kontext_dir)).eval()
    batch = collate(rows, SIZE)
    targets, inputs = batch.targets, batch.inputs
    cache = TargetLatents(tmp_path / "latents")
    first = cache(policy, rows, targets, inputs)
    assert cache.encoded == 2 and torch.equal(first, policy.encode_images(targets, inputs))
    again = cache(policy, rows[::-1], targets.flip(0), inputs.flip(0))  # read back, in any order
    assert cache.encoded == 2 and torch.equal(again, first.flip(0))
    # another canvas (or base checkpoint) is another key: never another VAE's latents
    other = build_policy(model_config(kontext_dir, resolution=48)).eval()
    cache(other, rows, collate(rows, 48).targets, collate(rows, 48).inputs)
    assert cache.encoded == 4 and len(list((tmp_path / "latents").iterdir())) == 2


def test_reference_latents_are_encoded_once_per_image(kontext_dir):
    """prepare() VAE-encodes each condition image once (cached under a digest of its pixels): the K samples of a
    group and every later forward reuse it, with the latents a direct encode gives; another image is encoded."""
    policy = build_policy(model_config(kontext_dir))
    images = canvases(2)  # (2, 1, 3, R, R)
    first = policy.prepare([PROMPT, PROMPT], images)[2]
    assert policy.references_encoded == 2
    again = policy.prepare([PROMPT] * 4, images.repeat_interleave(2, 0))[2]  # a group of K = 2 per image
    assert policy.references_encoded == 2 and torch.equal(again[::2], first) and torch.equal(again[1::2], first)
    with torch.no_grad():
        direct = policy.model.encode_reference(images[:, 0]).tokens
    assert torch.allclose(first, direct, atol=1e-6)
    policy.prepare([PROMPT], images[:1] * 0.5)
    assert policy.references_encoded == 3


@pytest.mark.parametrize("rank", [4, 0])
def test_the_base_kl_reference_is_the_released_model_with_no_fine_tuning(kontext_dir, rank):
    """rl.kl_reference=base: with LoRA the start's adapters with B = 0, in full fine-tuning the checkpoint's own
    transformer; either way v_ref is the bare checkpoint's velocity, not the trained start's. `start` anchors to the
    state rl began from."""
    from learner.tasks.nft import reference_state
    from posterrl.config import Config

    model = model_config(kontext_dir, lora={"rank": rank})
    policy = build_policy(model)
    perturb_adapters(policy)  # the start of rl: trained adapters (or a trained transformer)
    start = {k: v.detach().clone() for k, v in policy.policy_state().items()}
    bare = build_policy(model).eval()
    policy.eval()
    prepared = policy.prepare([PROMPT, "Fill the gap"], canvases())
    x_t, t = torch.randn(2, *policy.latent_shape), torch.tensor([0.3, 0.8])
    config = Config(model=model, rl={"kl_reference": "base"})
    v_ref = velocity_with(policy, reference_state(config, start), x_t, t, *prepared)
    assert torch.allclose(v_ref, bare(x_t, t, *prepared), atol=1e-6)
    assert not torch.allclose(policy(x_t, t, *prepared), v_ref, atol=1e-3)  # the start acts otherwise
    assert reference_state(Config(model=model), start) is start  # the default: the state rl started from
