"""Training targets of a latent-space policy, VAE-encoded once per row and kept on disk beside the run.

sft and distill draw the same rows many times (and the two experts and the student each train on them); a
released pipeline's VAE costs far more than a tiny policy's step, so each row's target latents are encoded the
first time a rank meets the row and read back from `<run>/latents/<key>/` afterwards. The key names what the
latents depend on (model kind, base checkpoint, canvas), so a cache never serves another VAE's latents; a file
name hashes the row's id and target file (path, size, mtime), so an edited target is encoded again. Files are
safetensors written to a temporary name and renamed, so ranks that meet the same row at once do not tear them.
A pixel-space policy's targets are the canvases themselves: nothing is cached.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from posterrl.data.manifest import ManifestRow
from posterrl.policy import Policy


def cache_key(policy: Policy) -> str:
    """What target latents depend on: the model kind, its base checkpoint (the VAE) and the canvas size."""
    spec = policy.spec
    return hashlib.sha256(f"{spec.kind}|{spec.pretrained_path}|{spec.resolution}".encode()).hexdigest()[:16]


def row_file(row: ManifestRow) -> str:
    assert row.target is not None, "training rows have targets"
    stat = Path(row.target).stat()
    text = f"{row.id}|{Path(row.target).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:32] + ".safetensors"


class TargetLatents:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.encoded = 0  # rows this process encoded (the rest were read back)

    def __call__(self, policy: Policy, rows: Sequence[ManifestRow], targets: torch.Tensor,
                 inputs: torch.Tensor) -> torch.Tensor:
        """Targets (B, 3, R, R) of `rows` and their inputs (B, N, 3, R, R), on the policy's device and dtype ->
        latents (B, *latent_shape)."""
        if not policy.cached_latents:  # arithmetic on canvases: cheaper than a file
            return policy.encode_images(targets, inputs)
        folder = self.directory / cache_key(policy)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / row_file(row) for row in rows]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        if missing:
            fresh = policy.encode_images(targets[missing], inputs[missing])  # (M, *latent_shape), one VAE call
            for i, latent in zip(missing, fresh, strict=True):
                temporary = paths[i].with_name(f"{paths[i].name}.{os.getpid()}.tmp")
                save_file({"latent": latent.detach().float().cpu().contiguous()}, str(temporary))
                os.replace(temporary, paths[i])
            self.encoded += len(missing)
        return torch.stack([load_file(str(path))["latent"] for path in paths]).to(targets.device, targets.dtype)
