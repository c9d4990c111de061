"""The weight broadcast group (gloo here; the same code runs NCCL on GPUs) between separate processes."""

import multiprocessing as mp

import torch

from posterrl.weight_sync import (
    BroadcastGroup,
    buckets,
    fingerprint,
    fingerprint_mismatch,
    open_store,
    probe_mismatch,
    trainable_tensors,
)


def _member(rank: int, world: int, ports, queue) -> None:
    torch.manual_seed(rank)  # every member starts with different weights
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(
        torch.bfloat16 if rank == 0 else torch.float32)  # a bf16 sender feeding fp32 receivers
    if rank == 0:  # as learner rank 0: the store is bound (port from the OS) before the others hear its port
        store = open_store("127.0.0.1", world, timeout_s=60)
        for _ in range(world - 1):
            ports.put(store.port)
        group = BroadcastGroup("127.0.0.1", store.port, rank, world, "gloo", timeout_s=60, store=store)
    else:
        group = BroadcastGroup("127.0.0.1", ports.get(timeout=60), rank, world, "gloo", timeout_s=60)
    moved = group.broadcast(trainable_tensors(model))
    names = [n for n, _ in model.named_parameters() if n.startswith("1.")]
    if rank != 0:  # a second sync of only some tensors (as LoRA sends only its adapters)
        with torch.no_grad():
            for p in model[1].parameters():
                p.zero_()
    group.broadcast(trainable_tensors(model, names), bucket_numel=4)  # two buckets: weight (6 > 4), bias
    queue.put((rank, moved, {k: v.float().tolist() for k, v in model.state_dict().items()}))


def test_rank0_weights_reach_every_receiver():
    world = 3
    ctx = mp.get_context("spawn")
    queue, ports = ctx.Queue(), ctx.Queue()
    members = [ctx.Process(target=_member, args=(rank, world, ports, queue)) for rank in range(world)]
    for process in members:
        process.start()
    results = dict((rank, (moved, state)) for rank, moved, state in (queue.get(timeout=120) for _ in members))
    for process in members:
        process.join(timeout=60)
        assert process.exitcode == 0
    sent_bytes, sender = results[0]
    assert sent_bytes == (4 * 3 + 3 + 3 * 2 + 2) * 4  # every parameter, as fp32 on the wire
    for rank in (1, 2):
        _, received = results[rank]
        assert received == sender  # bf16 values are exact in fp32; the zeroed tensors came back too


def test_fingerprints_tell_a_stale_zeroed_or_renamed_tensor_from_round_off():
    generator = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(4, 3, generator=generator), "b.bias": torch.randn(3, generator=generator)}
    sent = fingerprint(state)
    assert fingerprint({k: v.numpy() for k, v in state.items()}) == sent  # object-store arrays read the same
    assert fingerprint_mismatch(sent, fingerprint({k: v * (1 + 1e-9) for k, v in state.items()})) is None
    zeroed = fingerprint_mismatch(sent, fingerprint({**state, "b.bias": torch.zeros(3)}))
    assert zeroed is not None and zeroed.startswith("1 of 2 tensors differ: b.bias: sum 0 (expected ")
    # a permutation keeps the sum and the magnitude; the position-weighted sum tells it
    flipped = fingerprint_mismatch(sent, fingerprint({**state, "a.weight": state["a.weight"].flip(0)}))
    assert flipped is not None and flipped.startswith("1 of 2 tensors differ: a.weight")
    renamed = fingerprint_mismatch(sent, fingerprint({"a.weight": state["a.weight"], "c.bias": state["b.bias"]}))
    assert renamed == "1 tensors missing ['b.bias'], 1 unexpected ['c.bias']"


def test_buckets_hold_consecutive_tensors_up_to_the_limit():
    assert buckets([3, 3, 2, 10, 1], 6) == [[0, 1], [2], [3], [4]]  # 10 > 6 travels alone
    assert buckets([2, 2, 2], 100) == [[0, 1, 2]]  # a LoRA state: one collective
    assert buckets([], 5) == []


def test_probe_velocities_agree_to_round_off_or_are_named():
    v = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert probe_mismatch(v, v * (1 + 1e-7), 1e-4) is None
    message = probe_mismatch(v, v * 1.01, 1e-4)
    assert message is not None and message.startswith("probe velocity differs by 0.01 (relative L2; tolerance 0.0001)")
