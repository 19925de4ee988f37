"""Chunked vs naive logprob recomputation at Qwen's real vocabulary: peak memory and time, forward + backward.

    .venv/bin/python benchmarks/logprobs.py                     # 8 x 1024 tokens, vocab 151,936, hidden 128
    .venv/bin/python benchmarks/logprobs.py --batch 2 --tokens 512

Only the part that differs is measured: the lm_head over random final hidden states [B*T, H] and the fp32
log-softmax + gather, then backward of a weighted sum (as a policy loss would). Naive = full logits, log_softmax,
gather (what most RL trainers do); chunked = `vlm_sapo.models.logprobs.chunked_logprobs` (fused) and the per-chunk
torch.utils.checkpoint path used under ZeRO-3.

Memory: each variant runs in a fresh subprocess; peak = getrusage(RUSAGE_SELF).ru_maxrss after the run minus the
same reading after the inputs are allocated (tensors this large are mmap-ed by glibc and given back on free, so RSS
tracks live tensors). On CUDA, torch.cuda.max_memory_allocated is used instead. Time: best of --repeats runs.
The naive variant needs about 3 x B*T*vocab*4 bytes (15 GB at the defaults); it is refused when MemAvailable is
smaller than that plus a margin, so the benchmark never pushes a shared machine into the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked", "checkpoint")


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(args: argparse.Namespace) -> dict:
    """Run one variant in this process and return its measurements (called in a fresh subprocess)."""
    import torch

    from vlm_sapo.models.logprobs import _checkpointed_logprob, chunked_logprobs

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n = args.batch * args.tokens
    hidden = torch.randn(n, args.hidden, device=device, dtype=dtype).requires_grad_()
    lm_head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
    torch.nn.init.normal_(lm_head.weight, std=0.02)
    targets = torch.randint(0, args.vocab, (n,), device=device)
    advantages = torch.randn(n, device=device)

    def step():
        if args.variant == "naive":
            logits = lm_head(hidden).float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
            del logits
        elif args.variant == "chunked":
            logp, _ = chunked_logprobs(hidden, lm_head.weight, targets, chunk_size=args.chunk_size)
        else:
            logp, _ = _checkpointed_logprob(lm_head, hidden, targets, 1.0, args.chunk_size, False)
        (logp * advantages).sum().backward()
        value = float(logp.detach().double().sum())
        grads = (float(hidden.grad.double().abs().sum()), float(lm_head.weight.grad.double().abs().sum()))
        hidden.grad = None
        lm_head.weight.grad = None
        return value, grads

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _maxrss_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        value, grads = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _maxrss_bytes()
    return {
        "variant": args.variant,
        "extra_peak_bytes": peak - base,
        "peak_bytes": peak,
        "best_s": min(times),
        "times_s": times,
        "sum_logp": value,
        "grad_abs_sums": grads,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128, help="tiny model's hidden size (lm_head input)")
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2/2.5/3-VL padded vocabulary")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="naive,chunked,checkpoint", help="comma-separated subset")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    n = args.batch * args.tokens
    print(
        f"tokens {args.batch} x {args.tokens}, vocab {args.vocab}, hidden {args.hidden}, {args.dtype} on "
        f"{args.device}, chunk {args.chunk_size}; memory: "
        f"{'cuda max_memory_allocated' if args.device.startswith('cuda') else 'ru_maxrss of a fresh subprocess'}"
    )
    results = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        available = _mem_available_bytes()
        need = 3 * n * args.vocab * 4 + (2 << 30) if variant == "naive" else 4 * args.chunk_size * args.vocab * 4
        if args.device == "cpu" and available is not None and available < need:
            print(
                f"{variant:>10}: skipped, needs about {need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is "
                "available (use --batch/--tokens to shrink)"
            )
            continue
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", variant]
        proc = subprocess.run(child, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{variant:>10}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(
        f"{'variant':>10} {'extra peak GiB':>15} {'peak GiB':>9} {'best s':>8} {'vs naive mem':>13} {'vs naive time':>14}"
    )
    naive = results.get("naive")
    for variant, r in results.items():
        mem_ratio = f"{r['extra_peak_bytes'] / naive['extra_peak_bytes']:.1%}" if naive else "-"
        time_ratio = f"{r['best_s'] / naive['best_s']:.2f}x" if naive else "-"
        print(
            f"{variant:>10} {r['extra_peak_bytes'] / 2**30:>15.2f} {r['peak_bytes'] / 2**30:>9.2f} "
            f"{r['best_s']:>8.2f} {mem_ratio:>13} {time_ratio:>14}"
        )
    if naive:
        for variant, r in results.items():
            dv = abs(r["sum_logp"] - naive["sum_logp"]) / max(1.0, abs(naive["sum_logp"]))
            dg = max(abs(a - b) / max(1e-12, abs(b)) for a, b in zip(r["grad_abs_sums"], naive["grad_abs_sums"]))
            print(f"{variant:>10} agrees with naive: sum(logp) rel diff {dv:.1e}, grad |sum| rel diff {dg:.1e}")


if __name__ == "__main__":
    main()
