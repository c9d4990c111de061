import json

import pytest
import torch
from diffusers import FluxTransformer2DModel

from posterrl.policy import SPEC_FILE, EditPolicy


def _inputs(policy, batch=3, n_inputs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = policy.spec.resolution
    x_t = torch.randn(batch, 3, r, r, generator=g)
    t = torch.rand(batch, generator=g)
    refs = torch.rand(batch, n_inputs, 3, r, r, generator=g) * 2 - 1
    ids, mask = policy.tokenize(["Fill the masked region.", "Extend this poster to its full size.", "x"][:batch])
    return x_t, t, ids, mask, refs


def test_pack_unpack_inverse(tiny_policy):
    r = tiny_policy.spec.resolution
    images = torch.randn(2, 3, r, r)
    tokens = tiny_policy.pack(images)
    assert tokens.shape == (2, tiny_policy.spec.tokens_per_image, 3 * tiny_policy.spec.patch_size**2)
    assert torch.equal(tiny_policy.unpack(tokens), images)
    # token 1 is the second patch of the first patch row
    p = tiny_policy.spec.patch_size
    assert torch.equal(tokens[0, 1].reshape(3, p, p), images[0, :, :p, p : 2 * p])


def test_velocity_shape_and_input_dependence(tiny_policy):
    x_t, t, ids, mask, refs = _inputs(tiny_policy)
    with torch.no_grad():
        v = tiny_policy(x_t, t, ids, mask, refs)
        v_other_ref = tiny_policy(x_t, t, ids, mask, refs.flip(1))
        v_other_text = tiny_policy(x_t, t, ids.flip(0), mask.flip(0), refs)
    assert v.shape == x_t.shape and torch.isfinite(v).all()
    # Reference tokens carry their image index in the rotary ids, so their order matters;
    # the instruction matters too.
    assert not torch.allclose(v, v_other_ref)
    assert not torch.allclose(v, v_other_text)


def test_gradients_reach_transformer_and_text_encoder(tiny_config):
    policy = EditPolicy.from_config(tiny_config.model)
    x_t, t, ids, mask, refs = _inputs(policy)
    policy(x_t, t, ids, mask, refs).pow(2).mean().backward()
    assert policy.transformer.x_embedder.weight.grad.abs().sum() > 0
    assert policy.text_encoder.shared.weight.grad.abs().sum() > 0


def test_init_is_seeded(tiny_config):
    a = EditPolicy.from_config(tiny_config.model)
    b = EditPolicy.from_config(tiny_config.model)
    c = EditPolicy.from_config(tiny_config.model.model_copy(update={"seed": 1}))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.transformer.proj_out.weight, c.transformer.proj_out.weight)


def test_saved_policy_reloads_bitwise(tiny_policy, tmp_path):
    tiny_policy.save_pretrained(tmp_path / "policy")
    spec = json.loads((tmp_path / "policy" / SPEC_FILE).read_text())
    assert spec["resolution"] == tiny_policy.spec.resolution
    assert spec["sampler"] == {"solver": "euler", "num_steps": 8, "shift": 1.0}  # the layout earlier versions saved
    reloaded = EditPolicy.from_pretrained(tmp_path / "policy")
    assert reloaded.spec.sampler == tiny_policy.spec.sampler
    x_t, t, ids, mask, refs = _inputs(tiny_policy)
    with torch.no_grad():
        assert torch.equal(tiny_policy(x_t, t, ids, mask, refs), reloaded(x_t, t, ids, mask, refs))
    # The transformer is a plain diffusers model on disk.
    bare = FluxTransformer2DModel.from_pretrained(tmp_path / "policy" / "transformer")
    assert torch.equal(bare.proj_out.weight, tiny_policy.transformer.proj_out.weight)


def test_not_a_policy_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported posterrl policy"):
        EditPolicy.from_pretrained(tmp_path)


def test_real_model_kinds_are_refused_clearly(tiny_config):
    model = tiny_config.model.model_copy(update={"kind": "flux_kontext", "pretrained_path": "/x"})
    with pytest.raises(NotImplementedError, match="only 'tiny_flux'"):
        EditPolicy.from_config(model)


def _variant(tiny_config, **update):
    return EditPolicy.from_config(tiny_config.model.model_copy(update=update), tiny_config.rollout).eval()


def test_residual_latents_of_one_input_edits_are_the_difference_from_it(tiny_config):
    policy = _variant(tiny_config, residual=True)
    assert not policy.pixel_space  # rollouts carry the latents: a clamped canvas does not give them back
    x_t, _, _, _, refs = _inputs(policy, n_inputs=1)
    targets = x_t.clamp(-1, 1)
    latents = policy.encode_images(targets, refs)
    assert torch.equal(latents, targets - refs[:, 0])
    assert not policy.encode_images(refs[:, 0], refs).any()  # "keep the input" is the zero latent
    assert torch.allclose(policy.decode_latents(latents, refs), targets, atol=1e-6)
    # several inputs: a composition, on the plain canvas flow
    _, _, _, _, several = _inputs(policy, n_inputs=2)
    assert torch.equal(policy.encode_images(targets, several), targets)
    assert torch.equal(policy.decode_latents(x_t, several), x_t.clamp(-1, 1))
    plain = _variant(tiny_config, residual=False)
    assert plain.pixel_space and torch.equal(plain.encode_images(targets, refs), targets)


def test_input_concat_puts_the_first_input_in_the_noisy_tokens(tiny_config):
    policy = _variant(tiny_config, input_concat=True)
    c = 3 * policy.spec.patch_size**2
    assert policy.transformer.x_embedder.in_features == 2 * c and policy.transformer.proj_out.out_features == c
    x_t, t, ids, mask, refs = _inputs(policy)
    captured = {}
    hook = policy.transformer.x_embedder.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    with torch.no_grad():
        v = policy(x_t, t, ids, mask, refs)
    hook.remove()
    hidden, tokens = captured["x"], policy.spec.tokens_per_image  # (B, T + N*T, 2C)
    assert v.shape == x_t.shape
    assert torch.equal(hidden[:, :tokens, :c], policy.pack(x_t))
    assert torch.equal(hidden[:, :tokens, c:], policy.pack(refs[:, 0]))
    assert not hidden[:, tokens:, :c].any()  # input tokens: their own pixels in the second half only
    assert torch.equal(hidden[:, tokens : 2 * tokens, c:], policy.pack(refs[:, 0]))


def test_sample_prediction_turns_the_output_into_a_velocity(tiny_config, tmp_path):
    # Same seed, same weights: the transformer's output is v for one policy and x0_hat for the other.
    velocity, sample = _variant(tiny_config, prediction="velocity"), _variant(tiny_config, prediction="sample")
    x_t, t, ids, mask, refs = _inputs(velocity)
    t = torch.tensor([1.0, 0.5, 0.001])
    with torch.no_grad():
        raw = velocity(x_t, t, ids, mask, refs)
        v = sample(x_t, t, ids, mask, refs)
    expected = (x_t - raw) / t.clamp(min=0.02).view(-1, 1, 1, 1)
    assert torch.allclose(v, expected, atol=1e-5)
    # an Euler step from t to 0 lands on the network's x0_hat
    assert torch.allclose(x_t[:2] - t[:2].view(-1, 1, 1, 1) * v[:2], raw[:2], atol=1e-5)
    sample.save_pretrained(tmp_path / "p")
    reloaded = EditPolicy.from_pretrained(tmp_path / "p")
    assert reloaded.spec.prediction == "sample"
    with torch.no_grad():
        assert torch.equal(reloaded(x_t, t, ids, mask, refs), v)


def test_sample_prediction_for_edits_switches_per_number_of_inputs(tiny_config):
    # sample_for_edits: x0_hat for one-input edits, v for compositions of several inputs; the loss weight
    # follows (t^2 where x0 is predicted, so the loss is the x0 error; 1 elsewhere).
    velocity = _variant(tiny_config, prediction="velocity")
    edits = _variant(tiny_config, prediction="sample_for_edits")
    t = torch.tensor([1.0, 0.5, 0.001])
    for n_inputs, predicts_x0 in ((1, True), (2, False)):
        x_t, _, ids, mask, refs = _inputs(velocity, n_inputs=n_inputs)
        with torch.no_grad():
            raw, v = velocity(x_t, t, ids, mask, refs), edits(x_t, t, ids, mask, refs)
        expected = (x_t - raw) / t.clamp(min=0.02).view(-1, 1, 1, 1) if predicts_x0 else raw
        assert torch.allclose(v, expected, atol=1e-5), n_inputs
        weight = edits.loss_weight(t, refs)
        assert torch.allclose(weight, torch.tensor([1.0, 0.25, 0.0004]) if predicts_x0 else torch.ones(3)), n_inputs
    assert torch.equal(velocity.loss_weight(t, refs), torch.ones(3))


def test_tiny_options_are_refused_for_released_pipelines():
    from posterrl.config import ConfigError, load_config

    for option in ("model.residual=true", "model.input_concat=true", "model.prediction=sample"):
        with pytest.raises(ConfigError, match=option.split("=")[0].replace(".", r"\.")):
            load_config("configs/flux_kontext_tiny.yaml", [option])
