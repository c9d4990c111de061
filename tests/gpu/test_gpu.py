"""What only a GPU machine can check, on the tiny FLUX.1 Kontext checkpoint (`pytest -m gpu tests/gpu`;
scripts/gpu_check.sh runs them with the benchmark):

- a bf16 LoRA NFT step through the real learner core in-process (DeepSpeed, an NCCL group of world size 1);
- a RolloutWorker on the GPU against one on the CPU: the same weights (fingerprinted) and the same samples;
- the NCCL weight broadcast between two processes on two GPUs, into a real RolloutWorker;
- vllm's import, where it is installed.

Marked `gpu`: the default run and .ci/run leave them out. Each is skipped, naming what it needs, where torch.cuda
has no GPU or too few. POSTERRL_GPU_TESTS_ON_CPU=1 runs the same code on the CPU (gloo for NCCL, "cpu" for
"cuda"): a dry run of the tests themselves on a machine without a GPU, not a check of the GPU path.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from posterrl.config import ModelConfig, load_config
from posterrl.data.manifest import ManifestRow, load_manifest, write_manifest
from posterrl.data.tasks import build_samples, write_samples
from posterrl.experience import RlSample
from posterrl.flow import SamplerConfig
from posterrl.models import tiny_pipelines
from posterrl.policies import build_policy
from posterrl.policy import quiet_model_libraries
from posterrl.weight_sync import fingerprint, fingerprint_mismatch
from rollout.worker import RolloutWorker

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("POSTERRL_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
BACKEND = "gloo" if ON_CPU else "nccl"
REPO = Path(__file__).resolve().parents[2]
PEER = Path(__file__).with_name("broadcast_peer.py")
RESOLUTION = 64  # 4 x 4 packed latent tokens per canvas
STEPS = 4
# GPU against CPU, both float32 with TF32 off: the same operations, summed in another order by other kernels
# (about 1e-6 relative per operation), through 4 Euler steps and the VAE decoder. Images lie in [-1, 1].
IMAGE_TOLERANCE = 1e-3
LATENT_TOLERANCE = 1e-3  # relative to the largest latent magnitude


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(count: int, why: str = ""):
    """Skip unless torch.cuda sees `count` GPUs (or the dry run on the CPU)."""
    return pytest.mark.skipif(
        not ON_CPU and visible_gpus() < count,
        reason=f"needs {'a CUDA GPU' if count == 1 else f'{count} CUDA GPUs'}{why}; torch.cuda sees "
               f"{visible_gpus()} (torch.cuda.is_available() is {torch.cuda.is_available()})")


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    quiet_model_libraries()
    return tiny_pipelines.make_tiny("flux_kontext", tmp_path_factory.mktemp("gpu") / "flux_kontext", seed=0)


def model_settings(kontext_dir: Path) -> dict:
    """The tiny Kontext policy as configs/flux_kontext_tiny.yaml has it (LoRA rank 4), at RESOLUTION."""
    config = load_config(REPO / "configs" / "flux_kontext_tiny.yaml",
                         [f"model.pretrained_path={kontext_dir}", f"model.resolution={RESOLUTION}"])
    return config.model.model_dump(mode="json")


def trained_adapters(settings: dict, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """The policy state with every adapter tensor moved, as training would (B starts at 0: the base); CPU fp32."""
    policy = build_policy(ModelConfig.model_validate(settings))
    generator = torch.Generator().manual_seed(seed)
    return {k: v.detach() + scale * torch.randn(v.shape, generator=generator)
            for k, v in policy.policy_state().items()}


def manifest_rows(out: Path) -> list[ManifestRow]:
    rows = []
    for index in range(2):
        samples = build_samples(index, seed=5, size=RESOLUTION, tasks=("filling", "layout-driven"), split="val")
        rows += write_samples(samples, out)
    write_manifest(rows, out / "manifest.jsonl")
    return load_manifest(out / "manifest.jsonl").rows


@contextmanager
def no_tf32():
    """float32 on the GPU as on the CPU: cuDNN convolutions (the VAE) use TF32 by default."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------- (a) learner


@needs_gpus(1)
def test_bf16_lora_nft_step_through_the_learner_core(kontext_dir):
    """One DiffusionNFT step of the tiny Kontext policy's LoRA in bf16 on one GPU, through learner/core.py as a
    learner rank runs it (DeepSpeed ZeRO-2, an NCCL group of world size 1, two micro batches accumulated)."""
    overrides = [f"model.pretrained_path={kontext_dir}", f"model.resolution={RESOLUTION}", "learner.num_ranks=1",
                 "learner.gpus_per_rank=1", "learner.micro_batch_size=2", "learner.warmup_steps=0",
                 "deepspeed.precision=bf16", "rl.batch_size=4", "rl.lr=1e-3", "rl.kl_coef=1e-2"]
    config = load_config(REPO / "configs" / "flux_kontext_tiny.yaml", overrides)
    settings = config.model.model_dump(mode="json")
    start = trained_adapters(settings, seed=1)  # B != 0: every adapter tensor gets a gradient at the first step
    latent_shape = build_policy(config.model).latent_shape
    generator = torch.Generator().manual_seed(0)
    samples = [RlSample(f"p{i // 2}", "filling", "Fill the masked region", torch.rand(1, 3, RESOLUTION, RESOLUTION,
                                                                                      generator=generator) * 2 - 1,
                        torch.randn(latent_shape, generator=generator), r)
               for i, r in enumerate((1.0, 0.0, 0.75, 0.25))]

    from learner.core import Learner  # DeepSpeed at import: only where this test runs
    from learner.tasks import NftTask

    if not ON_CPU:
        torch.cuda.reset_peak_memory_stats()
    learner = Learner(config.model_dump(mode="json"), rank=0, world_size=1)
    try:
        assert learner.device.type == DEVICE
        port = learner.open_rendezvous("127.0.0.1")
        assert learner.join("127.0.0.1", port) == 0
        assert dist.get_backend() == BACKEND and dist.get_world_size() == 1
        trainable = learner.start("nft", seed=0, init_state=start)
        assert trainable == sum(v.numel() for v in start.values())
        module = learner.module
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in module.parameters()} == {DEVICE}
        adapters = sorted(k for k, p in module.named_parameters() if p.requires_grad)
        assert adapters == sorted(start) and all(".lora_" in k for k in adapters)
        before = {k: v.detach().clone() for k, v in module.state_dict().items()}

        stats = learner.train_step(samples)

        assert math.isfinite(stats.loss) and math.isfinite(stats.grad_norm) and stats.grad_norm > 0
        assert stats.step == 1 and stats.samples == 4 and stats.extra["r_mean"] == pytest.approx(0.5)
        after = module.state_dict()
        assert [k for k in adapters if torch.equal(after[k], before[k])] == []  # every adapter tensor moved
        assert [k for k in before if k not in start and not torch.equal(after[k], before[k])] == []  # base did not
        # theta_old (bf16, on the GPU beside theta) still holds the starting adapters until the epoch's end
        task = learner.task
        assert isinstance(task, NftTask)
        theta_old = task.sampling_state
        assert {v.device.type for v in theta_old.values()} == {DEVICE}
        assert all(torch.equal(theta_old[k], start[k].to(DEVICE, torch.bfloat16)) for k in start)
        assert fingerprint_mismatch(fingerprint(learner.sampling_weights()), learner.sampling_fingerprint()) is None
        peak = "-" if ON_CPU else f"{torch.cuda.max_memory_allocated() / 2**20:.1f} MiB"
        print(f"\nNFT step on {DEVICE} ({BACKEND}): loss {stats.loss:.4g}, grad norm {stats.grad_norm:.4g}, "
              f"peak GPU memory {peak}")
    finally:
        learner.shutdown()
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------------- (b) rollout


@needs_gpus(1)
def test_rollout_worker_on_the_gpu_samples_what_the_cpu_worker_samples(kontext_dir, tmp_path):
    """Object-store-style weights (read-only float32 numpy arrays) into a RolloutWorker(device="cuda"): it reports
    the sender's fingerprint, holds the weights on the GPU, and samples the CPU worker's images."""
    settings = model_settings(kontext_dir)
    # adapters far from the base, so that what they change stands well above the tolerance
    sent = {k: v.numpy() for k, v in trained_adapters(settings, seed=2, scale=1.0).items()}
    for array in sent.values():
        array.setflags(write=False)  # as ray.get hands them out
    rows = manifest_rows(tmp_path)
    sampler = SamplerConfig("euler", STEPS)

    gpu = RolloutWorker(model=settings, device=DEVICE)
    load = gpu.load_weights(sent, version=5)
    assert load.version == gpu.policy_version == 5
    assert fingerprint_mismatch(fingerprint(sent), load.fingerprint) is None
    assert {p.device.type for p in gpu.policy.parameters()} == {DEVICE}
    with no_tf32():
        on_gpu = gpu.sample(rows, 2, 0, sampler)

    cpu = RolloutWorker(model=settings, device="cpu")
    assert fingerprint_mismatch(fingerprint(sent), cpu.load_weights(sent, version=5).fingerprint) is None
    on_cpu = cpu.sample(rows, 2, 0, sampler)
    base = RolloutWorker(model=settings, device="cpu").sample(rows, 2, 0, sampler)  # B = 0: the bare checkpoint

    assert [g.prompt_id for g in on_gpu] == [g.prompt_id for g in on_cpu] == [r.id for r in rows]
    assert all(g.policy_version == 5 and g.samples.device.type == "cpu" for g in on_gpu)
    image_diff = max(float((a.samples - b.samples).abs().max()) for a, b in zip(on_gpu, on_cpu))
    latents_gpu, latents_cpu, latents_base = (torch.stack([g.latents for g in groups if g.latents is not None])
                                              for groups in (on_gpu, on_cpu, base))
    assert len(latents_gpu) == len(latents_cpu) == len(latents_base) == len(rows)  # a latent policy keeps them
    scale = float(latents_cpu.abs().max())
    latent_diff = float((latents_gpu - latents_cpu).abs().max()) / scale
    adapters_effect = float((latents_cpu - latents_base).abs().max()) / scale
    print(f"\n{DEVICE} vs cpu: max |image diff| {image_diff:.3g}, max |latent diff| / max |latent| "
          f"{latent_diff:.3g}; the adapters' own effect on the latents {adapters_effect:.3g}")
    assert image_diff < IMAGE_TOLERANCE and latent_diff < LATENT_TOLERANCE
    assert adapters_effect > 10 * LATENT_TOLERANCE  # the loaded weights matter: the comparison is not vacuous


@needs_gpus(1)
def test_bf16_rollouts_on_the_gpu_stay_close_to_fp32(kontext_dir, tmp_path):
    """rollout.dtype=bf16 (the GPU presets): the weights are rounded on load and the fingerprint is exactly the
    sender's rounded to bf16; the latents stay within a few percent of float32 sampling on the same GPU."""
    settings = model_settings(kontext_dir)
    sent = {k: v.numpy() for k, v in trained_adapters(settings, seed=2, scale=1.0).items()}
    rows = manifest_rows(tmp_path)
    sampler = SamplerConfig("euler", STEPS)
    out = {}
    for dtype in ("fp32", "bf16"):
        worker = RolloutWorker(model=settings, device=DEVICE, dtype=dtype)
        load = worker.load_weights(sent, version=1)
        assert fingerprint_mismatch(fingerprint(sent, as_dtype=worker.dtype), load.fingerprint) is None
        with no_tf32():
            out[dtype] = torch.stack([g.latents for g in worker.sample(rows, 2, 0, sampler) if g.latents is not None])
    error = float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm())
    print(f"\nbf16 vs fp32 rollouts on {DEVICE}: relative L2 error of the latents {error:.3g}")
    assert out["bf16"].dtype == torch.float32 and error < 5e-2


# ---------------------------------------------------------------------------------------------------- (c) broadcast


def peer(role: str, settings: dict, gpu: int, log: Path, port: int | None = None) -> subprocess.Popen:
    """tests/gpu/broadcast_peer.py as `role` on GPU `gpu` alone; its stderr into `log` (a pipe could fill up)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if not ON_CPU:  # one GPU per process, as Ray gives an actor: "cuda" is device 0 in each
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if visible else str(gpu)
    command = [sys.executable, str(PEER), role, "--model", json.dumps(settings), "--backend", BACKEND,
               "--device", DEVICE] + ([] if port is None else ["--port", str(port)])
    with open(log, "w") as stderr:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=REPO)


def result_of(process: subprocess.Popen, stdout: str, log: Path) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, (f"{log.stem} peer exited {process.returncode}:\n{stdout}\n"
                                               f"{log.read_text()[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


@needs_gpus(2, " (NCCL refuses two ranks on one GPU)")
def test_nccl_broadcast_between_two_gpus_moves_a_lora_state(kontext_dir, tmp_path):
    """Learner-side rank 0 on GPU 0 broadcasts bf16 adapters over NCCL; a RolloutWorker on GPU 1 receives them into
    its float32 policy and its fingerprint matches the sender's."""
    settings = model_settings(kontext_dir)
    logs = tmp_path / "send.log", tmp_path / "receive.log"
    sender = peer("send", settings, 0, logs[0])
    receiver = None
    try:
        assert sender.stdout is not None
        first = sender.stdout.readline()  # "PORT n" once its rendezvous store listens
        if not first.startswith("PORT "):
            sender.wait(timeout=60)
            pytest.fail(f"the sender said {first!r} instead of its port:\n{logs[0].read_text()[-4000:]}")
        receiver = peer("receive", settings, 1, logs[1], port=int(first.split()[1]))
        received = result_of(receiver, receiver.communicate(timeout=300)[0], logs[1])
        sent = result_of(sender, sender.communicate(timeout=120)[0], logs[0])
    finally:
        for process in (sender, receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    expected = {k: tuple(v) for k, v in sent["fingerprint"].items()}
    got = {k: tuple(v) for k, v in received["fingerprint"].items()}
    base = {k: tuple(v) for k, v in sent["base_fingerprint"].items()}
    print(f"\nsent {sent['bytes']} bytes from {sent['device']} over {BACKEND}; the receiver holds them on "
          f"{received['devices']} as {received['dtypes']}, {received['seconds'] * 1e3:.1f} ms")
    assert fingerprint_mismatch(expected, got) is None
    assert fingerprint_mismatch(base, got) is not None  # the receiver's own adapters were replaced
    assert received["version"] == 7 and received["dtypes"] == ["torch.float32"]
    assert [d.split(":")[0] for d in received["devices"]] == [DEVICE]


# ---------------------------------------------------------------------------------------------------- (d) vllm


@needs_gpus(1)
def test_vllm_imports_on_the_gpu_machine():
    """The vllm judge backend's package loads beside this torch (its serving is tested by the vllm_cpu test)."""
    vllm = pytest.importorskip("vllm", reason="needs vllm (pip install -e '.[vllm]'); not installed here")
    version = getattr(vllm, "__version__", "")
    print(f"\nvllm {version} beside torch {torch.__version__} (CUDA {torch.version.cuda})")
    assert version and version[0].isdigit()
