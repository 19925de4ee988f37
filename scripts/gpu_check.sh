#!/usr/bin/env bash
# GPU check on one GPU (torch + transformers only: no DeepSpeed, no vLLM, no download): transformers rollouts and
# learner updates of a random Qwen2.5-VL-3B-sized model in bf16; prints tokens/s/GPU, MFU and the GPU memory an
# engine's sleep frees, and a final `GPU_CHECK {json}` line (also $OUT/gpu_check.json). At most 8 minutes.
#   bash scripts/gpu_check.sh [--steps 4 --prompts 8 --n 8 --max-new-tokens 256 ...]   (see scripts/gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.cuda.get_device_name(0))"
# SIGINT at 7.5 min lets the script print what it measured; no new step starts after 6 min (--time-limit)
exec timeout --signal=INT --kill-after=20 450 "$PY" scripts/gpu_check.py --steps 4 --time-limit 360 "$@"
