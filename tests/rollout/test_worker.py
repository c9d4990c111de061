import pytest
import torch

from posterrl.data.manifest import load_manifest, write_manifest
from posterrl.data.tasks import TASKS, build_samples, write_samples
from posterrl.flow import SamplerConfig
from posterrl.weight_sync import fingerprint, fingerprint_mismatch
from rollout.worker import RolloutWorker


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    manifest_rows = []
    for index in range(2):
        manifest_rows += write_samples(build_samples(index, seed=3, size=32, tasks=TASKS, split="val"), out)
    write_manifest(manifest_rows, out / "manifest.jsonl")
    return load_manifest(out / "manifest.jsonl", require_target=True).rows


@pytest.fixture(scope="module")
def worker(tiny_config):
    return RolloutWorker(model=tiny_config.model.model_dump(mode="json"))


def test_groups_come_back_in_row_order_with_version(worker, rows, tiny_policy):
    worker.load_weights(tiny_policy.state_dict(), version=7)
    groups = worker.sample(rows, group_size=2, base_seed=0, sampler=SamplerConfig(num_steps=2))
    assert [g.prompt_id for g in groups] == [r.id for r in rows]
    r = tiny_policy.spec.resolution
    for group, row in zip(groups, rows):
        assert group.policy_version == 7
        assert group.samples.shape == (2, 3, r, r)
        images = group.output_images(size=row.load_target().size)
        assert len(images) == 2 and images[0].size == row.load_target().size


def test_a_prompt_samples_the_same_in_any_batch(worker, rows):
    sampler = SamplerConfig(num_steps=2)
    alone = worker.sample(rows[:1], group_size=2, base_seed=1, sampler=sampler)[0]
    in_batch = worker.sample(rows, group_size=2, base_seed=1, sampler=sampler)[0]
    assert torch.allclose(alone.samples, in_batch.samples, atol=1e-5)


def test_input_detail_outputs_keep_the_input_where_the_sample_left_it(tiny_config, tiny_policy, rows):
    """model.input_detail: the groups of in-frame one-input rows carry their first input, and a sample equal to its
    input canvas comes out as that input at full resolution; without the option nothing changes."""
    without = RolloutWorker(model={**tiny_config.model.model_dump(mode="json"), "input_detail": False})
    assert all(g.frame_input is None for g in without.sample(rows, 1, 0, SamplerConfig(num_steps=1)))
    model = {**tiny_config.model.model_dump(mode="json"), "residual": True, "input_detail": True}
    worker = RolloutWorker(model=model)
    worker.load_weights(tiny_policy.state_dict(), version=1)
    groups = worker.sample(rows, group_size=2, base_seed=0, sampler=SamplerConfig(num_steps=1))
    for group, row in zip(groups, rows):
        if row.task in ("extending", "filling", "identity-driven"):
            assert group.frame_input is not None, row.task
            group.samples = group.inputs[:1].expand(2, -1, -1, -1).clone()
            images = group.output_images(size=row.load_target().size)
            assert all(image.tobytes() == row.load_inputs()[0].convert("RGB").tobytes() for image in images)
        else:
            assert group.frame_input is None, row.task


def test_worker_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        RolloutWorker()


def test_object_store_arrays_are_used_in_place_and_sample_like_copied_weights(tiny_config, tiny_policy, rows):
    sampler = SamplerConfig(num_steps=2)
    copied = RolloutWorker(model=tiny_config.model.model_dump(mode="json"))
    copied.load_weights(tiny_policy.state_dict(), version=1)
    arrays = {k: v.numpy().copy() for k, v in tiny_policy.state_dict().items()}
    for array in arrays.values():
        array.setflags(write=False)  # as the object store hands them out
    shared = RolloutWorker(model=tiny_config.model.model_dump(mode="json"))
    shared.load_weights(arrays, version=1)
    key = next(iter(arrays))
    assert shared.policy.state_dict()[key].data_ptr() == arrays[key].ctypes.data  # no copy
    a = copied.sample(rows[:2], group_size=2, base_seed=0, sampler=sampler)
    b = shared.sample(rows[:2], group_size=2, base_seed=0, sampler=sampler)
    assert all(torch.equal(x.samples, y.samples) for x, y in zip(a, b))

    # Tensors after shared arrays: the read-only parameters are replaced, not written into.
    shared.load_weights(copied.policy.state_dict(), version=2)
    assert shared.policy.state_dict()[key].data_ptr() != arrays[key].ctypes.data
    c = shared.sample(rows[:2], group_size=2, base_seed=0, sampler=sampler)
    assert all(torch.equal(x.samples, y.samples) for x, y in zip(a, c))


def test_bf16_rollouts_round_the_weights_on_load_and_sample_close_to_fp32(tiny_config, tiny_policy, rows):
    """rollout.dtype=bf16: float32 weights (object-store arrays) are rounded as they load; the fingerprint the
    worker reports is exactly that of the sender's state rounded to bf16, and not of the float32 state; samples
    come back in float32, close to a float32 worker's (the tiny policy's outputs span [-1, 1])."""
    sampler = SamplerConfig(num_steps=2)
    state = tiny_policy.state_dict()
    arrays = {k: v.numpy().copy() for k, v in state.items()}
    fp32 = RolloutWorker(model=tiny_config.model.model_dump(mode="json"))
    bf16 = RolloutWorker(model=tiny_config.model.model_dump(mode="json"), dtype="bf16")
    fp32.load_weights(arrays, version=1)
    load = bf16.load_weights(arrays, version=1)
    assert {p.dtype for p in bf16.policy.parameters()} == {torch.bfloat16}
    assert fingerprint_mismatch(fingerprint(state, as_dtype=torch.bfloat16), load.fingerprint) is None
    assert fingerprint_mismatch(fingerprint(state), load.fingerprint) is not None  # the rounding is seen
    a = fp32.sample(rows[:2], group_size=2, base_seed=0, sampler=sampler)
    b = bf16.sample(rows[:2], group_size=2, base_seed=0, sampler=sampler)
    for x, y in zip(a, b, strict=True):
        assert y.samples.dtype == torch.float32 and torch.isfinite(y.samples).all()
        assert 0 < (x.samples - y.samples).abs().mean() < 0.05
    assert bf16.probe().dtype == torch.float32


@pytest.mark.parametrize("kind", ["flux_kontext", "qwen_image_edit"])
def test_released_pipelines_sample_in_bf16(kind, rows, tmp_path):
    """The released architectures (tiny make-tiny folders) in bf16 through the same worker: their LoRA adapters
    are rounded on load, outputs and latents come back in float32, close to float32 sampling."""
    from posterrl.config import load_config
    from posterrl.models import tiny_pipelines

    folder = tiny_pipelines.make_tiny(kind, tmp_path / kind, seed=0)
    model = load_config(f"configs/{kind}_tiny.yaml", [f"model.pretrained_path={folder}"]).model
    out = {}
    for dtype in ("fp32", "bf16"):
        worker = RolloutWorker(model=model.model_dump(mode="json"), dtype=dtype)
        state = {k: (v + 0.01).float().numpy() for k, v in worker.policy.policy_state().items()}
        load = worker.load_weights(state, version=1)
        assert fingerprint_mismatch(fingerprint(state, as_dtype=worker.dtype), load.fingerprint) is None
        out[dtype] = worker.sample(rows[:2], group_size=2, base_seed=0, sampler=SamplerConfig(num_steps=2))
    for x, y in zip(out["fp32"], out["bf16"], strict=True):
        assert y.samples.dtype == y.latents.dtype == torch.float32
        assert 0 < (x.samples - y.samples).abs().mean() < 0.05
