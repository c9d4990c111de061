import pytest
import torch

from posterrl.data.manifest import load_manifest, write_manifest
from posterrl.data.tasks import TASKS, build_samples, write_samples
from posterrl.flow import SamplerConfig
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
