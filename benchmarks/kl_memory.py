"""Memory of the KL reference policy (`algorithm.kl_coef > 0` without LoRA): one frozen copy of the parameters.

    python benchmarks/kl_memory.py            # the tiny Qwen2.5-VL of `vlm-sapo init-tiny`, fp32 on CPU

Prints the parameter count, the copy's bytes (n_params x bytes per parameter of the learner's dtype), and the
process's resident memory before and after the copy is made, then the same formula for real model sizes in bf16.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import torch


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    from vlm_sapo.learner.reference import ReferencePolicy
    from vlm_sapo.models.loading import load_policy
    from vlm_sapo.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = load_policy(build_tiny(Path(tmp) / "tiny", "qwen2_5_vl", seed=0), dtype="float32", device="cpu")
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # fault in the loaded (memory-mapped) weights first: the copy reads them
        sum(float(p.sum()) for p in model.parameters())
    gc.collect()
    before = rss_bytes()
    ref = ReferencePolicy(model).to("cpu")
    gc.collect()
    grown = rss_bytes() - before
    print(f"tiny Qwen2.5-VL: {n:,} parameters; reference copy {ref.nbytes:,} bytes = {n:,} x 4 (fp32); "
          f"resident memory grew by {grown:,} bytes ({grown / ref.nbytes:.2f}x the formula)")
    assert torch.equal(next(ref.model.parameters()), next(model.parameters()))
    for name, params in (("Qwen2.5-VL-3B", 3_754_622_976), ("Qwen2.5-VL-7B", 8_292_166_656)):
        print(f"{name}: {params:,} x 2 bytes (bf16) = {params * 2 / 2**30:.1f} GiB per rank, whatever the ZeRO stage")


if __name__ == "__main__":
    main()
