"""Plug-in loading and the worker pool: isolation of failures, time limits, recovery, routing, and safety."""

from __future__ import annotations

import os
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewards import chart, grounding, length_penalty, math
from rewards import format as fmt
from tests.scoring.reward_helpers import as_model
from vlm_sapo.scoring import RewardError, RewardSpec, ScoreItem, load_reward
from vlm_sapo.scoring.pool import RewardPool
from vlm_sapo.tasks import default_reward_specs

GEOMETRY_META = {"choices": ["30", "60", "120", "240"]}
BOX_META = {"coord_system": "abs_original", "image_size": [640, 480]}


def _write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------------------------- plug-ins
def test_path_entry_point_and_batch_rewards_run_in_the_pool(tmp_path):
    per_sample = _write(
        tmp_path,
        "my_reward.py",
        """
        def shout(completion, ground_truth, *, bonus=0.0, **meta):
            return {"overall": completion.count("!") / 10 + bonus, "bangs": completion.count("!")}
        """,
    )
    batched = _write(
        tmp_path,
        "batch_reward.py",
        """
        REWARD_TYPE = "batch"

        def compute_score(completions, ground_truths, metas, **kwargs):
            return [{"overall": float(c.strip() == str(g)), "rank": i} for i, (c, g) in enumerate(zip(completions, ground_truths))]
        """,
    )
    specs = [
        RewardSpec(f"{per_sample}:shout", weight=2.0, kwargs={"bonus": 0.25}),
        RewardSpec("length_penalty", weight=0.5, kwargs={"max_chars": 10}),  # the installed entry point
        RewardSpec(str(batched)),  # a file alone means its compute_score
        "format",
    ]
    completions = ["7", "wow!! " * 3, "<think>x</think><answer>7</answer>"]
    items = [ScoreItem(f"s{i}", "math", c, "7", {}) for i, c in enumerate(completions)]
    with RewardPool(specs, workers=2, timeout_s=10) as pool:
        results = pool.score(items)
    for i, (c, result) in enumerate(zip(completions, results)):
        shout = c.count("!") / 10 + 0.25
        penalty = min(1.0, max(0, len(c) - 10) / 10)
        batch = float(c.strip() == "7")
        well_formed = float(c.startswith("<think>"))
        assert result.error is None
        assert result.overall == pytest.approx(2.0 * shout - 0.5 * penalty + batch + well_formed)
        assert result.scores["my_reward.shout/bangs"] == c.count("!")
        assert result.scores["length_penalty/penalty"] == pytest.approx(penalty)
        assert result.scores["batch_reward/rank"] == i
        assert result.scores["format/format"] == well_formed
        assert result.scores["my_reward.shout/error"] == 0.0
    # the same functions, loaded in this process, agree
    assert load_reward("length_penalty").fn is length_penalty.compute_score
    assert load_reward(f"{per_sample}:shout").score_one("a!", None, {"ignored_meta": 1})["bangs"] == 1


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(RewardError, match="did you mean 'math'"):
        load_reward("maths")
    with pytest.raises(RewardError, match="not found"):
        load_reward(str(tmp_path / "missing.py") + ":compute_score")
    path = _write(tmp_path, "r.py", "def compute_score(completion, ground_truth):\n    return 1.0\n")
    with pytest.raises(RewardError, match="no function `other`"):
        load_reward(f"{path}:other")
    with pytest.raises(RewardError, match=r"does not take kwargs \['scale'\]"):
        load_reward(RewardSpec(str(path), kwargs={"scale": 2}))
    broken = _write(tmp_path, "broken.py", "import not_a_module_anywhere\n")
    with pytest.raises(RewardError, match="failed to import"):
        load_reward(str(broken))
    odd = _write(tmp_path, "odd.py", "REWARD_TYPE = 'stream'\ndef compute_score(c, g):\n    return 0.0\n")
    with pytest.raises(RewardError, match="REWARD_TYPE"):
        load_reward(str(odd))
    with pytest.raises(RewardError, match="share the label"):
        RewardPool(["math", RewardSpec("math", tasks=["math"])], workers=1)
    # a reward without **meta still runs: it gets only the meta keys it names
    assert load_reward(str(path)).score_one("x", None, {"image_size": (1, 1)}) == {"overall": 1.0}


# ------------------------------------------------------------------------------------------------ isolation
FLAKY = """
import os, sys, time

def compute_score(completion, ground_truth, **meta):
    if "raise" in completion:
        raise ValueError("refusing " + completion)
    if "hang" in completion:
        time.sleep(3600)
    if "sysexit" in completion:
        sys.exit(0)
    if "exit" in completion:
        os._exit(3)
    if "nan" in completion:
        return {"overall": float("nan")}
    if "text" in completion:
        return {"overall": "high"}
    return {"overall": 1.0, "pid": os.getpid()}
"""


def test_raising_hanging_and_dying_rewards_are_isolated_and_the_pool_recovers(tmp_path):
    path = _write(tmp_path, "flaky.py", FLAKY)
    timeout = 1.5
    with RewardPool([str(path)], workers=2, timeout_s=timeout) as pool:
        first = pool.score([ScoreItem("warm", "math", "fine", None, {})])[0]
        assert first.overall == 1.0
        old_pids = {w.proc.pid for w in pool._workers}
        bad = ["raise", "hang", "exit", "sysexit", "nan", "text"]
        items = [ScoreItem(f"bad-{b}", "math", b, None, {}) for b in bad]
        items += [ScoreItem(f"good-{i}", "math", "fine", None, {}) for i in range(6)]
        start = time.monotonic()
        results = pool.score(items)
        elapsed = time.monotonic() - start
        assert elapsed < timeout + 8.0, f"scoring took {elapsed:.1f} s"
        by_id = {item.sample_id: r for item, r in zip(items, results)}
        for b in bad:
            assert by_id[f"bad-{b}"].overall == 0.0 and by_id[f"bad-{b}"].scores["flaky/error"] == 1.0
        assert "ValueError: refusing raise" in by_id["bad-raise"].error
        assert "timed out after 1.5 s" in by_id["bad-hang"].error
        assert "died (exit code 3)" in by_id["bad-exit"].error
        assert "SystemExit" in by_id["bad-sysexit"].error
        assert "is nan" in by_id["bad-nan"].error and "not a number" in by_id["bad-text"].error
        assert all(by_id[f"good-{i}"].overall == 1.0 and by_id[f"good-{i}"].error is None for i in range(6))
        assert (pool.failures, pool.timeouts, pool.restarts) == (5, 1, 2)
        # the hung and the dead worker are gone, and fresh ones keep scoring
        assert not any(_alive(pid) for pid in old_pids - {w.proc.pid for w in pool._workers})
        again = pool.score([ScoreItem(f"after-{i}", "math", "fine", None, {}) for i in range(4)])
        assert [r.overall for r in again] == [1.0] * 4
        pids = {w.proc.pid for w in pool._workers}
    assert not any(_alive(pid) for pid in pids), "close() must end the workers"


def test_a_reward_failing_on_every_sample_raises_naming_it(tmp_path):
    path = _write(tmp_path, "always_broken.py", "def compute_score(c, g, **m):\n    return {'accuracy': 1.0}\n")
    with RewardPool(["format", str(path)], workers=1, timeout_s=5) as pool:
        with pytest.raises(RewardError, match=r"'always_broken' failed on all 2 sample\(s\).*no 'overall' score"):
            pool.score([ScoreItem("a", "math", "x", None, {}), ScoreItem("b", "math", "y", None, {})])
        assert pool.failures == 2


# --------------------------------------------------------------------------------------------------- routing
def test_mixed_batch_routes_each_sample_to_its_task_reward():
    specs = default_reward_specs(["math", "chart", "grounding", "math"])
    assert [(s.name, s.tasks) for s in specs] == [
        ("math", ("math",)),
        ("chart", ("chart",)),
        ("grounding", ("grounding",)),
    ]
    items = [
        ScoreItem("m", "math", as_model("B"), "B", GEOMETRY_META),
        ScoreItem("c", "chart", as_model("4,900"), "4900", {}),
        ScoreItem("g", "grounding", as_model("[10, 10, 50, 50]"), [10, 10, 50, 40], BOX_META),
    ]
    with RewardPool([*specs, RewardSpec("format", weight=0.5, tasks=["chart"])], workers=2) as pool:
        m, c, g = pool.score(items)
        assert {k.split("/")[0] for k in m.scores} == {"math"}
        assert {k.split("/")[0] for k in c.scores} == {"chart", "format"}
        assert {k.split("/")[0] for k in g.scores} == {"grounding"}
        assert m.overall == math.compute_score(items[0].completion, "B", **GEOMETRY_META)["overall"] == 1.0
        assert c.overall == pytest.approx(1.0 + 0.5 * 1.0)
        assert g.scores["grounding/iou"] == pytest.approx(1600 / 1600 * (30 * 40) / (40 * 40))
        with pytest.raises(RewardError, match=r"no reward applies to task\(s\) \['counting'\]"):
            pool.score([ScoreItem("x", "counting", "3", "3", {})])
    with (
        RewardPool([RewardSpec("math", tasks=["math"])], workers=1) as pool,
        pytest.raises(RewardError, match="grounding"),
    ):
        pool.validate_tasks(["math", "grounding"])


def test_math_scores_off_the_main_thread():
    """math-verify's signal.alarm raises off the main thread; the reward must switch it off there, not fail."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(math.compute_score(as_model(r"\frac{2}{4}"), "0.5")))
    thread.start()
    thread.join(30)
    assert out == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}


# ---------------------------------------------------------------------------------------------------- safety
ALL_REWARDS = [
    ("math", lambda c: math.compute_score(c, "B", **GEOMETRY_META)),
    ("math_free", lambda c: math.compute_score(c, "5")),
    ("chart", lambda c: chart.compute_score(c, "5")),
    ("grounding", lambda c: grounding.compute_score(c, [0, 0, 10, 10], **BOX_META)),
    ("format", lambda c: fmt.compute_score(c)),
    ("length_penalty", lambda c: length_penalty.compute_score(c)),
]


def _payload_completions(marker: Path) -> list[str]:
    code = f"__import__('os').system('touch {marker}')"
    return [
        code,
        as_model(code),
        as_model(f"\\boxed{{{code}}}"),
        as_model(f"${code}$"),
        as_model(f"\\({code}\\)"),
        f"the answer is \\boxed{{{code}}}",
        as_model(f"D. {code}"),
        as_model(f"x = {code}"),
        as_model(f'[{{"bbox_2d": {code}}}]'),
        as_model(f"eval({code!r})"),
    ]


def test_code_in_a_completion_is_never_executed():
    control = Path(f"/tmp/pwned_control_{uuid.uuid4().hex}")
    from sympy.parsing.sympy_parser import parse_expr  # the payload is live: sympy's own parser would run it

    parse_expr(f"__import__('os').system('touch {control}')")
    assert control.exists()
    control.unlink()

    marker = Path(f"/tmp/pwned_{uuid.uuid4().hex}")
    completions = _payload_completions(marker)
    for name, score in ALL_REWARDS:
        for completion in completions:
            result = score(completion)
            assert result.get("accuracy", 0.0) == 0.0, (name, completion)
    items = [ScoreItem(f"p{i}", "math", c, "B", GEOMETRY_META) for i, c in enumerate(completions)]
    specs = ["math", "chart", "format", "length_penalty"]
    with RewardPool(specs, workers=2, timeout_s=10) as pool:
        results = pool.score(items)
    with RewardPool(["grounding"], workers=1) as pool:
        results += pool.score([ScoreItem(f"g{i}", "x", c, [0, 0, 10, 10], BOX_META) for i, c in enumerate(completions)])
    assert all(r.error is None for r in results)
    assert all(r.scores["math/accuracy"] == 0.0 and r.scores["chart/accuracy"] == 0.0 for r in results[:10])
    assert all(r.scores["grounding/iou"] == 0.0 for r in results[10:])
    assert not marker.exists(), "a reward executed code from a completion"


def _hostile_completions() -> list[str]:
    tower = "9^9^9^9^9"
    braces = "{" * 10_000 + "}" * 10_000
    megabyte = "7" * 1_000_000
    return [
        as_model(tower),
        f"\\boxed{{{tower}}}",
        as_model("9^{9^{9^{9^{9}}}}"),
        as_model("10^{10^{10}}"),
        as_model("99999!"),
        as_model(megabyte),
        megabyte,
        as_model("[" + megabyte),
        as_model(braces),
        f"\\boxed{{{braces}}}",
        as_model("(" * 10_000 + "5" + ")" * 10_000),
        "<answer>" * 50_000,
    ]


def test_hostile_answers_score_zero_in_bounded_time():
    for name, score in ALL_REWARDS[:4]:
        for completion in _hostile_completions():
            start = time.monotonic()
            result = score(completion)
            elapsed = time.monotonic() - start
            assert result["accuracy"] == 0.0, (name, completion[:40])
            assert elapsed < 2.0, f"{name} took {elapsed:.2f} s on {completion[:40]!r}"
    items = [ScoreItem(f"h{i}", "math", c, "5", {}) for i, c in enumerate(_hostile_completions())]
    start = time.monotonic()
    with RewardPool(["math", "chart"], workers=2, timeout_s=10) as pool:
        results = pool.score(items)
        assert pool.timeouts == 0 and pool.failures == 0
    assert all(r.scores["math/accuracy"] == 0.0 and r.scores["chart/accuracy"] == 0.0 for r in results)
    assert time.monotonic() - start < 15.0
