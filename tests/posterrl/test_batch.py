"""Tensor batches moved to where a model runs."""

import torch

from posterrl.batch import on_device


def test_on_device_casts_floats_to_the_model_precision_and_only_moves_the_rest():
    tensors = {"pixels": torch.rand(2, 3), "input_ids": torch.tensor([[1, 2]]),
               "attention_mask": torch.ones(1, 2, dtype=torch.long), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    moved = on_device(tensors, torch.device("cpu"), torch.bfloat16)
    assert moved.keys() == tensors.keys()
    assert moved["pixels"].dtype == torch.bfloat16
    torch.testing.assert_close(moved["pixels"].float(), tensors["pixels"], atol=1e-2, rtol=1e-2)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        assert moved[key].dtype == torch.long and torch.equal(moved[key], tensors[key])
