"""Faults during `vlm-sapo train`, at the trainer level, on a tiny Qwen2.5-VL with the transformers rollout backend.

One run is interrupted six ways and resumed five times; an uninterrupted twin runs beside it as the reference:

    P1  kill (SIGKILL) after step 2's rollouts                       -> resume point step_1
    P2  --resume with a 1 MB file-size limit: step 2's checkpoint cannot be written (a full disk) -> clean stop
    P3  --resume, kill in the middle of writing step 3's checkpoint  -> step_2 valid, .step_3.tmp half-written
        (then step_2 is corrupted on disk: one byte flipped, size unchanged)
    P4  --resume: step_2 fails its checksum and is skipped with a warning (step_1 used); kill after step 3's
        checkpoint, before its metrics line
    P5  --resume from step_3 restores step 3's metrics line from the checkpoint; kill inside step 4's update
        (then step_3 is truncated on disk)
    P6  --resume from step_2 (step_3 fails its size check); NaN advantages at steps 4 and 5: two non-finite updates
        in a row stop the run, naming the step and its samples

Every run also carries: 5 bad rows skipped when loading and one when rendering (vision tokens in its question;
`data.on_bad_row=skip`, counted in metrics), a user reward that kills its worker process (`os._exit`) on one prompt
and hangs on another (scored 0, counted, the run goes on), and a NaN at step 2 (that update skipped and logged).
The final log must equal the reference's step by step: same steps, same samples in the same order (also checked
against the sampler, computed independently), same rewards and losses; no process of the run may outlive it.

One test per phase, in order, on one shared run (`fault_run`, module-scoped, with the reference started beside it);
a test run on its own first replays the phases before it, and after a failed phase the later ones are skipped.
"""

from __future__ import annotations

import math
import resource
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.reliability.reliability_helpers import (
    FIXTURE_DIR,
    checkpoints,
    expected_batches,
    finish,
    fixture_rows,
    metrics,
    run,
    run_env,
    start,
    steps,
    train_args,
    wait_for_no_processes,
    write_jsonl,
)
from vlm_sapo.checkpoint import verify_checkpoint

FLAKY_REWARD = """
import os, time

def compute_score(completion, ground_truth, *, fault=None, **meta):
    if fault == "crash":
        os._exit(7)  # takes the worker process down with it
    if fault == "hang":
        time.sleep(600)
    return {"overall": (sum(map(ord, completion)) % 5) / 4, "chars": float(len(completion))}
"""
STEPS = 5
NAN_STEPS = (2, 4, 5)
COMPARED = ("reward/overall", "train/loss", "train/policy_loss", "train/grad_norm", "train/skipped_updates",
            "train/mismatch_logp_abs_diff_max", "batch/advantage_abs_mean", "response/length_mean")


def _data(tmp_path: Path) -> tuple[Path, Path, list[list[str]], dict[str, str], dict[int, str], str]:
    rows = fixture_rows()
    good_ids = [r["id"] for r in rows]
    unfiltered = expected_batches(good_ids, STEPS)
    smuggled = unfiltered[3][1]  # step 4's second prompt cannot be rendered: the next one drawn replaces it
    order = expected_batches(good_ids, STEPS, skip=frozenset({smuggled}))
    faults = {order[1][0]: "crash", order[3][0]: "hang"}  # one prompt of step 2 crashes its worker, one of step 4 hangs
    for r in rows:
        if r["id"] in faults:
            r["fault"] = faults[r["id"]]
        if r["id"] == smuggled:
            r["question"] += " <|image_pad|>"
    png = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(png)
    png.write_bytes(png.read_bytes()[:60])
    bad = [
        {"id": "bad_missing_image", "image": "images/no_such_file.png", "question": "q?", "answer": "1"},
        {"id": "bad_empty_question", "image": rows[0]["image"], "question": "   ", "answer": "1"},
        {"id": "bad_no_answer", "image": rows[0]["image"], "question": "q?"},
        {"id": "bad_truncated_image", "image": str(png), "question": "q?", "answer": "1"},
        '{"id": "bad_json", "question": ',
    ]
    problems = [", column 'image': image file not found", ", column 'question': question is empty",
                ", column 'answer': missing required field 'answer'",
                ", column 'image': unreadable or truncated image", ": invalid JSON"]
    mixed: list = []
    bad_lines = {}
    for i, r in enumerate(rows):
        mixed.append(r)
        if i % 5 == 2 and bad:
            mixed.append(bad.pop(0))
            bad_lines[len(mixed)] = problems.pop(0)
    assert not bad, "every bad row is placed between good ones"
    data = write_jsonl(tmp_path / "train.jsonl", mixed)
    reward = tmp_path / "flaky_reward.py"
    reward.write_text(FLAKY_REWARD)
    return data, reward, order, faults, bad_lines, smuggled


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _disk_full() -> None:
    """In the child before exec: writes past 1 MB fail with EFBIG (SIGXFSZ ignored) as they would on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@dataclass
class FaultRun:
    """The interrupted run, its reference twin, and how far through the phases it got."""

    tmp: Path
    model: Path
    data: Path
    reward: Path
    order: list[list[str]]
    faults: dict[str, str]
    bad_lines: dict[int, str]
    smuggled: str
    run_dir: Path
    ref_dir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    ref_tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    nan: str = ",".join(f"nan_loss:{s}" for s in NAN_STEPS)
    reference: subprocess.Popen | None = None
    tally: Counter = field(default_factory=Counter)
    done: int = 0  # phases passed
    failed: int = 0  # the phase that failed, if one did
    seen: dict[str, Any] = field(default_factory=dict)  # what a phase leaves for later checks

    @property
    def common(self) -> list[str]:
        return [f"data.train.0.path={self.data}", f"data.train.0.image_root={FIXTURE_DIR}", "data.on_bad_row=skip",
                f"rewards.functions=[{{name: '{self.reward}'}}]", "rewards.timeout_s=2", f"learner.steps={STEPS}",
                "checkpoint.every_steps=1", "checkpoint.keep_last=2", "learner.max_nonfinite_in_a_row=2"]

    def cmd(self, resume: bool) -> list[str]:
        return train_args(self.run_dir, self.model, *self.common, resume=resume)

    def run(self, phase: str, fault: str = "", **popen: Any) -> tuple[int, str]:
        env = run_env(self.tag, f"{self.nan},{fault}" if fault else self.nan)
        return run(self.cmd(phase != "p1"), env, self.tmp / f"{phase}.log", **popen)

    def through(self, phase: int, tally: Counter) -> None:
        """Run every phase up to `phase` that has not run yet (each once, in order)."""
        self.tally = tally
        while self.done < phase:
            if self.failed:
                pytest.skip(f"phase P{self.failed} failed")
            try:
                PHASES[self.done](self)
            except BaseException:
                self.failed = self.done + 1
                raise
            self.done += 1


PHASES: list[Callable[[FaultRun], None]] = []


def _phase(fn: Callable[[FaultRun], None]) -> Callable[[FaultRun], None]:
    PHASES.append(fn)
    return fn


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory, small_model: Path):
    tmp = tmp_path_factory.mktemp("train_faults")
    data, reward, order, faults, bad_lines, smuggled = _data(tmp)
    fr = FaultRun(tmp, small_model, data, reward, order, faults, bad_lines, smuggled, tmp / "run", tmp / "reference")
    fr.reference = start(train_args(fr.ref_dir, small_model, *fr.common), run_env(fr.ref_tag, fr.nan),
                         tmp / "reference.log")
    try:
        yield fr
    finally:
        if fr.reference.poll() is None:
            fr.reference.kill()
            fr.reference.wait()


@_phase
def _p1(fr: FaultRun) -> None:
    """Killed after step 2's rollouts."""
    rc, log = fr.run("p1", "kill_at:rollout:2")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert steps(fr.run_dir) == [1] and checkpoints(fr.run_dir) == ["step_1"]
    assert wait_for_no_processes(fr.tag) == [], "reward workers outlived the killed trainer"


@_phase
def _p2(fr: FaultRun) -> None:
    """The disk fills up while step 2's checkpoint is written."""
    run_dir = fr.run_dir
    rc, log = fr.run("p2", preexec_fn=_disk_full)
    assert rc == 1, log[-3000:]
    assert "training stopped: step 2: writing the checkpoint" in log and "disk full?" in log, log[-3000:]
    assert f"continues from {run_dir / 'checkpoints' / 'step_1'}" in log
    assert checkpoints(run_dir) == ["step_1"], "a failed save must leave nothing behind"
    verify_checkpoint(run_dir / "checkpoints" / "step_1")
    assert steps(run_dir) == [1], "a step whose checkpoint failed must not be logged"


@_phase
def _p3(fr: FaultRun) -> None:
    """Killed in the middle of writing step 3's checkpoint; then step_2 is corrupted on disk."""
    rc, log = fr.run("p3", "kill_at:checkpoint:3")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert steps(fr.run_dir) == [1, 2] and checkpoints(fr.run_dir) == [".step_3.tmp", "step_1", "step_2"]
    assert wait_for_no_processes(fr.tag) == []
    _flip_a_byte(next((fr.run_dir / "checkpoints" / "step_2").rglob("*model_states.pt")))


@_phase
def _p4(fr: FaultRun) -> None:
    """The corrupt step_2 is skipped (step_1 used); killed after step 3's checkpoint, before its metrics line."""
    run_dir = fr.run_dir
    rc, log = fr.run("p4", "kill_at:log:3")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert "skipping invalid checkpoint" in log and "step_2" in log and "sha256" in log, log[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_1'} at step 1" in log
    assert steps(run_dir) == [1, 2] and checkpoints(run_dir) == ["step_2", "step_3"]
    assert wait_for_no_processes(fr.tag) == []


@_phase
def _p5(fr: FaultRun) -> None:
    """Resumes from step_3 and logs step 3 from the checkpoint's copy; killed inside step 4's update; then step_3 is
    truncated on disk."""
    run_dir = fr.run_dir
    rc, log = fr.run("p5", "kill_at:update:4")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_3'} at step 3" in log
    assert "step 3: metrics line restored from its checkpoint" in log
    restored = metrics(run_dir)
    assert [r["step"] for r in restored] == [1, 2, 3] and restored[2]["batch_ids"] == fr.order[2]
    fr.seen["restored"] = restored
    assert wait_for_no_processes(fr.tag) == []
    optim = max((run_dir / "checkpoints" / "step_3").rglob("*.pt"), key=lambda f: f.stat().st_size)
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])


@_phase
def _p6(fr: FaultRun) -> None:
    """step_3 fails its size check (step_2 used); NaN at steps 4 and 5 stops the run, naming the step. The reference
    stops the same way."""
    rc, log = fr.run("p6")
    ref_rc, ref_log = finish(fr.reference, fr.tmp / "reference.log", timeout=300)
    fr.seen["ref_log"] = ref_log
    fr.tally.update(faults=8 + 2 + len(NAN_STEPS) + 6, recovered=5)  # kills, disk, bad files; crash, hang; NaNs; rows
    assert "skipping invalid checkpoint" in log and "step_3" in log and "(truncated?)" in log, log[-3000:]
    assert f"resumed from {fr.run_dir / 'checkpoints' / 'step_2'} at step 2" in log
    stop = (f"step 5: 2 non-finite updates in a row (learner.max_nonfinite_in_a_row); batch sample ids: "
            f"{sorted(fr.order[4])}")
    for rc_, log_ in ((rc, log), (ref_rc, ref_log)):
        assert rc_ == 1 and stop in log_, log_[-3000:]
        assert "non-finite loss or gradient: update skipped (1 in a row)" in log_
    assert wait_for_no_processes(fr.tag) == [] and wait_for_no_processes(fr.ref_tag) == []
    assert not any(p.name.endswith(".tmp") for p in (fr.run_dir / "checkpoints").iterdir())


@pytest.mark.slow
def test_p1_killed_after_rollouts(fault_run: FaultRun, tally: Counter) -> None:
    fault_run.through(1, tally)


@pytest.mark.slow
def test_p2_full_disk_stops_cleanly_keeping_the_last_checkpoint(fault_run: FaultRun, tally: Counter) -> None:
    fault_run.through(2, tally)


@pytest.mark.slow
def test_p3_killed_mid_checkpoint_leaves_the_previous_one_valid(fault_run: FaultRun, tally: Counter) -> None:
    fault_run.through(3, tally)


@pytest.mark.slow
def test_p4_corrupt_checkpoint_is_skipped_then_killed_before_the_metrics_line(fault_run: FaultRun,
                                                                            tally: Counter) -> None:
    fault_run.through(4, tally)


@pytest.mark.slow
def test_p5_metrics_line_restored_from_the_checkpoint_then_killed_in_an_update(fault_run: FaultRun,
                                                                              tally: Counter) -> None:
    fault_run.through(5, tally)


@pytest.mark.slow
def test_p6_truncated_checkpoint_is_skipped_and_nan_in_a_row_stops_the_run(fault_run: FaultRun,
                                                                          tally: Counter) -> None:
    fault_run.through(6, tally)


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_reference(fault_run: FaultRun, tally: Counter) -> None:
    fault_run.through(6, tally)
    fr, ref_log = fault_run, fault_run.seen["ref_log"]
    order, data = fr.order, fr.data
    rows, ref = metrics(fr.run_dir), metrics(fr.ref_dir)
    logged = [r["batch_ids"] for r in rows]
    lost = Counter(i for b in order[:4] for i in b) - Counter(i for b in logged for i in b)
    repeated = Counter(i for b in logged for i in b) - Counter(i for b in order[:4] for i in b)
    tally["lost"] += sum(lost.values()) + sum(repeated.values())
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [1, 2, 3, 4]
    assert logged == [r["batch_ids"] for r in ref] == order[:4]
    for mine, theirs in [*zip(rows, ref), (fr.seen["restored"][2], ref[2])]:
        for key in COMPARED:
            a, b = mine.get(key), theirs.get(key)
            assert (a is None) == (b is None), (mine["step"], key, a, b)
            if isinstance(a, str) or isinstance(b, str):  # non-finite values are logged as "nan" / "inf"
                assert a == b, (mine["step"], key, a, b)
            elif a is not None:
                assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (mine["step"], key, a, b)
        assert mine["data/skipped_rows"] == 5.0 + (mine["step"] >= 4), (mine["step"], mine["data/skipped_rows"])
        assert mine["train/skipped_updates"] == float(mine["step"] in NAN_STEPS)
    # the reference's pool counters are cumulative over one process: 2 worker deaths at step 2, 2 time-outs at step 4
    assert [(r["reward_pool/failures"], r["reward_pool/restarts"], r["reward_pool/timeouts"]) for r in ref] == [
        (0, 0, 0), (2, 2, 0), (2, 2, 0), (2, 4, 2)]
    assert "reward 'flaky_reward' scored 0 on sample" in ref_log and "reward worker died (exit code 7)" in ref_log
    assert "timed out after 2 s" in ref_log
    for sample_id in fr.faults:
        assert any(sample_id in b for b in logged)
    assert f"{data}: 5 bad row(s) skipped, 24 usable" in ref_log
    assert f"skipped sample {fr.smuggled!r}: prompt has 2 '<|image_pad|>' for 1 image(s)" in ref_log
    for line, problem in fr.bad_lines.items():
        assert f"skipped {data} line {line}{problem}" in ref_log, (line, problem)
