"""One member of a two-process weight broadcast (tests/gpu/test_gpu.py starts two of these).

    python tests/gpu/broadcast_peer.py send    --model JSON --backend nccl --device cuda
    python tests/gpu/broadcast_peer.py receive --model JSON --backend nccl --device cuda --port PORT

`send` (rank 0, as learner rank 0) opens the rendezvous store on loopback, prints `PORT <n>`, then broadcasts a
trained-looking LoRA state of the tiny FLUX.1 Kontext policy (`--model`: a ModelConfig as JSON) in bf16, as the
learner holds theta_old. `receive` (rank 1, as a rollout actor) is a real RolloutWorker on `--device` that joins
the group and takes the weights with `receive_weights`. Each prints one line `RESULT <json>`: the fingerprint of
what it sent or of what its policy holds afterwards. The parent gives each process one GPU through
CUDA_VISIBLE_DEVICES, as Ray does for its actors, so "cuda" is device 0 in both.
"""

from __future__ import annotations

import argparse
import json

import torch

from posterrl.config import ModelConfig
from posterrl.policies import build_policy
from posterrl.policy import quiet_model_libraries
from posterrl.weight_sync import BroadcastGroup, fingerprint, open_store
from rollout.worker import RolloutWorker

VERSION = 7


def trained_adapters(model: dict, seed: int) -> dict[str, torch.Tensor]:
    """The policy state of `model` with every adapter tensor moved, as training would (B starts at 0)."""
    policy = build_policy(ModelConfig.model_validate(model))
    generator = torch.Generator().manual_seed(seed)
    return {k: v.detach() + 0.1 * torch.randn(v.shape, generator=generator) for k, v in policy.policy_state().items()}


def send(model: dict, backend: str, device: str) -> dict:
    base = build_policy(ModelConfig.model_validate(model)).policy_state()
    state = {k: v.to(device, torch.bfloat16) for k, v in trained_adapters(model, seed=1).items()}
    store = open_store("127.0.0.1", 2)
    print(f"PORT {store.port}", flush=True)
    group = BroadcastGroup("127.0.0.1", store.port, 0, 2, backend, timeout_s=120, store=store)
    sent = group.broadcast(list(state.values()))
    return {"fingerprint": fingerprint(state), "base_fingerprint": fingerprint(base), "bytes": sent,
            "device": str(next(iter(state.values())).device)}


def receive(model: dict, backend: str, device: str, port: int) -> dict:
    worker = RolloutWorker(model=model, device=device)
    worker.join_weight_broadcast("127.0.0.1", port, 1, 2, backend)
    load = worker.receive_weights(VERSION)
    held = worker.policy.policy_state()
    return {"fingerprint": load.fingerprint, "version": load.version, "seconds": load.seconds,
            "devices": sorted({str(v.device) for v in held.values()}),
            "dtypes": sorted({str(v.dtype) for v in held.values()})}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["send", "receive"])
    parser.add_argument("--model", required=True, help="a ModelConfig as JSON")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    quiet_model_libraries()
    model = json.loads(args.model)
    if args.role == "send":
        result = send(model, args.backend, args.device)
    else:
        result = receive(model, args.backend, args.device, args.port)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
