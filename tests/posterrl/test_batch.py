"""Tensor batches moved to where a model runs."""

import torch

from posterrl.batch import collate, on_device, stretched_to


def test_on_device_casts_floats_to_the_model_precision_and_only_moves_the_rest():
    tensors = {"pixels": torch.rand(2, 3), "input_ids": torch.tensor([[1, 2]]),
               "attention_mask": torch.ones(1, 2, dtype=torch.long), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    moved = on_device(tensors, torch.device("cpu"), torch.bfloat16)
    assert moved.keys() == tensors.keys()
    assert moved["pixels"].dtype == torch.bfloat16
    torch.testing.assert_close(moved["pixels"].float(), tensors["pixels"], atol=1e-2, rtol=1e-2)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        assert moved[key].dtype == torch.long and torch.equal(moved[key], tensors[key])


def test_rescaling_inputs_can_be_stretched_to_the_output_aspect(tmp_path):
    """model.stretch_rescaled_input: a rescaling row (meta.target_aspect) shows its input stretched to the target
    aspect, so it fills the output's letterbox; every other row, and the default, keep the input as it is."""
    from posterrl.data.manifest import load_manifest, write_manifest
    from posterrl.data.tasks import TASKS, build_samples, write_samples
    from posterrl.images import canvas_tensor

    write_manifest(write_samples(build_samples(0, seed=4, size=64, tasks=TASKS), tmp_path), tmp_path / "m.jsonl")
    rows = load_manifest(tmp_path / "m.jsonl").rows
    rescaling = next(r for r in rows if r.task == "rescaling")
    image, aspect = rescaling.load_inputs()[0], rescaling.meta["target_aspect"]
    assert abs(image.width / image.height - aspect[0] / aspect[1]) > 0.05  # the row does change the aspect
    stretched = collate([rescaling], 32, stretch_rescaled=True).inputs[0, 0]
    expected = stretched_to(image, (aspect[0], aspect[1]))
    assert abs(expected.width / expected.height - aspect[0] / aspect[1]) < 0.02
    assert max(expected.size) == max(image.size)
    assert torch.equal(stretched, canvas_tensor(expected, 32))
    assert not torch.equal(stretched, collate([rescaling], 32).inputs[0, 0])
    for row in rows:
        if row.task != "rescaling":
            assert torch.equal(collate([row], 32, stretch_rescaled=True).inputs, collate([row], 32).inputs), row.task


def test_frame_inputs_are_the_one_input_rows_already_in_the_output_frame(tmp_path):
    """model.input_detail adds back the detail of an input the output shares its frame with: extending, filling and
    identity-driven (same size as the target); not rescaling (another aspect, stretched or not) nor the
    compositions of several inputs."""
    from posterrl.data.manifest import load_manifest, write_manifest
    from posterrl.data.tasks import TASKS, build_samples, write_samples

    write_manifest(write_samples(build_samples(0, seed=4, size=64, tasks=TASKS), tmp_path), tmp_path / "m.jsonl")
    for row in load_manifest(tmp_path / "m.jsonl").rows:
        for stretch in (False, True):
            frame_input = collate([row], 32, stretch_rescaled=stretch).frame_inputs[0]
            if row.task in ("extending", "filling", "identity-driven"):
                assert frame_input is not None and frame_input.size == row.load_target().size, row.task
                assert frame_input.tobytes() == row.load_inputs()[0].convert("RGB").tobytes()
            else:
                assert frame_input is None, row.task


def test_uncanvas_detailed_keeps_the_input_where_the_canvas_did_not_change_it():
    """The output is the input at its own resolution plus the canvas's change, upsampled: no change returns the
    input exactly (the detail a 32 px canvas cannot hold included), a uniform change shifts every pixel by it."""
    import numpy as np
    from PIL import Image

    from posterrl.images import canvas_tensor, uncanvas, uncanvas_detailed

    rng = np.random.default_rng(0)
    frame = Image.fromarray(rng.integers(30, 220, size=(48, 64, 3), dtype=np.uint8))  # (w, h) = (64, 48)
    canvas_input = canvas_tensor(frame, 32)
    kept = uncanvas_detailed(canvas_input.clone(), canvas_input, frame)
    assert kept.size == frame.size and kept.tobytes() == frame.tobytes()
    through_canvas = np.asarray(uncanvas(canvas_input, (64, 48), (64, 48)), dtype=np.float32)
    assert np.abs(through_canvas - np.asarray(frame, dtype=np.float32)).mean() > 10  # what the canvas alone loses
    brighter = np.asarray(uncanvas_detailed(canvas_input + 0.2, canvas_input, frame), dtype=np.int32)
    assert np.abs(brighter - np.asarray(frame, dtype=np.int32) - 26).max() <= 1  # 0.2 of [-1, 1] is 25.5 levels
    assert uncanvas_detailed(canvas_input, canvas_input, frame, size=(32, 24)).size == (32, 24)
