"""Checkpoint files read back as tensors and plain data only: nothing in a run directory is unpickled.

A pickle can run any code when it is loaded, and run directories get copied, shared and resumed. So the
learner's own files are safetensors + JSON (rng_rank{R}.safetensors), and DeepSpeed's *.pt files are read
with torch.load(weights_only=True) through a checkpoint engine of ours. weights_only allows tensors,
containers, numbers and strings; DeepSpeed's model-state file holds only those (module and optimizer
states, ds_config, ds_version, client_state, param shapes). Its ZeRO-1/2 optimizer file (fp32 and bf16,
DeepSpeed 0.19.8) also holds three small DeepSpeed types, found by loading every file of a ZeRO-0/1/2 x
fp32/bf16 checkpoint, which are the only classes allowed besides: `LossScaler` (a static scale: the
attributes cur_scale and dynamic), `ZeroStageEnum` (an IntEnum) and `fragment_address` (a dataclass of two
ints, numel and start). None of them runs code when built. (fp16's DynamicLossScaler is not allowed:
posterrl trains in fp32 or bf16.)
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from posterrl.checkpoints import CheckpointError

SAFE_DEEPSPEED_CLASSES = [LossScaler, ZeroStageEnum, fragment_address]  # see the module docstring


def load_tensors_only(path: str | Path, map_location: Any = None) -> Any:
    """torch.load without unpickling code: tensors, plain containers and SAFE_DEEPSPEED_CLASSES only."""
    try:
        with torch.serialization.safe_globals(SAFE_DEEPSPEED_CLASSES):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("\n")
        detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
        raise CheckpointError(f"{path}: refused to load, it holds more than tensors and plain data ({detail}); "
                              "a checkpoint folder from an untrusted source can run code when unpickled, so "
                              "posterrl never does") from None


class TensorOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (saving is unchanged)."""

    def load(self, path: str, map_location=None):
        return load_tensors_only(path, map_location)


def use_tensor_only_loads(engine: Any) -> None:
    """Give a DeepSpeed engine our checkpoint engine in place of the TorchCheckpointEngine it chose."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed chose {type(engine.checkpoint_engine).__name__}, not TorchCheckpointEngine: "
                           "learner/safe_load.py cannot vouch for how it loads")
    engine.checkpoint_engine = TensorOnlyCheckpointEngine(engine._config)


def save_rng_state(path: str | Path) -> None:
    """torch, numpy and python RNG states of this process as tensors (safetensors) + JSON metadata."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "python_state": torch.tensor(internal, dtype=torch.int64)}
    info = {"numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "gauss_next": gauss_next}}
    save_file(tensors, str(path), metadata={"rng": json.dumps(info)})


def load_rng_state(path: str | Path) -> None:
    """Restore what save_rng_state wrote; a file that is not that names itself in a CheckpointError."""
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:  # the safetensors header: 8-byte length, then JSON with __metadata__
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        info = json.loads(header["__metadata__"]["rng"])
        numpy_state = (str(info["numpy"]["name"]),
                       tensors["numpy_keys"].numpy().astype(np.uint32), int(info["numpy"]["pos"]),
                       int(info["numpy"]["has_gauss"]), float(info["numpy"]["cached_gaussian"]))
        gauss_next = info["python"]["gauss_next"]
        python_state = (int(info["python"]["version"]), tuple(int(v) for v in tensors["python_state"].tolist()),
                        None if gauss_next is None else float(gauss_next))
        torch.set_rng_state(tensors["torch"])
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not an RNG state file written by posterrl ({type(exc).__name__}: {exc}); "
                              "delete the checkpoint folder to start the stage over") from None
