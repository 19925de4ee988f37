"""Security properties of the package: no dangerous calls in its source (an AST scan, with every allowed exception
listed and justified), remote code only when the recipe asks, reward code only from what the recipe names, and
offline operation that fails fast and clearly instead of waiting on a hub that is not there.
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.reliability_helpers import REPO, TRAIN, run_env
from vlm_sapo.scoring import RewardError, load_reward

SCANNED = [REPO / "vlm_sapo", REPO / "rewards", REPO / "scripts", REPO / "benchmarks"]
# Calls that run code or unpickle data, by the fully qualified name they resolve to.
FORBIDDEN = {
    "eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec",
    "sympy.sympify", "sympy.core.sympify.sympify", "sympy.parsing.sympy_parser.parse_expr", "sympy.parse_expr",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "marshal.load",
    "marshal.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "shelve.open",
    "pandas.read_pickle", "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.Loader",
    "yaml.UnsafeLoader", "yaml.FullLoader", "os.system", "os.popen", "code.interact", "runpy.run_path",
    "runpy.run_module",
}
# (file, qualified name) -> why it is safe. The test fails when an entry no longer matches anything, so the list
# stays exact.
ALLOWED = {
    ("vlm_sapo/scoring/rewards.py", "importlib.util.spec_from_file_location"):
        "imports the reward file named by path in the recipe (rewards.functions); nothing else is ever imported",
    ("vlm_sapo/scoring/rewards.py", "importlib.import_module"):
        "imports a built-in reward module from the fixed BUILTIN_REWARDS table (rewards.math, ...), never user text",
    ("vlm_sapo/rollout/registry.py", "importlib.import_module"):
        "imports a rollout engine's module from a \"module:Class\" entry registered in code (the built-in table or "
        "register_engine); a recipe's `rollout.backend` only selects a registered entry, never names a module",
}
ALSO_CHECKED = {"importlib.util.spec_from_file_location", "importlib.import_module"}


def _qualified_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> qualified name, from the module's imports (`import yaml as y`, `from pickle import loads`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _resolve(node: ast.AST, names: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(names.get(node.id, node.id))
    return ".".join(reversed(parts))


def scan(path: Path) -> list[tuple[str, int, str]]:
    """(qualified name, line, problem) for every dangerous call or reference in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = _qualified_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and not isinstance(getattr(node, "ctx", None), ast.Store):
            name = _resolve(node, names)
            if name in FORBIDDEN - {"eval", "exec", "compile", "__import__"} or name in ALSO_CHECKED:
                found.append((name, node.lineno, f"uses {name}"))
        if not isinstance(node, ast.Call):
            continue
        name = _resolve(node.func, names)
        if name in {"eval", "exec", "compile", "__import__"} and name not in names:  # the builtins, not a method
            found.append((name, node.lineno, f"calls {name}()"))
        keywords = {k.arg: k.value for k in node.keywords}
        if name in {"torch.load", "numpy.load"}:
            flag = "weights_only" if name == "torch.load" else "allow_pickle"
            want = name == "torch.load"
            value = keywords.get(flag)
            if not (isinstance(value, ast.Constant) and value.value is want):
                found.append((name, node.lineno, f"{name} without {flag}={want}"))
        if name and name.startswith("subprocess.") and isinstance(keywords.get("shell"), ast.Constant) \
                and keywords["shell"].value:
            found.append((name, node.lineno, f"{name}(shell=True)"))
        trust = keywords.get("trust_remote_code")
        if isinstance(trust, ast.Constant) and trust.value is True:
            found.append(("trust_remote_code", node.lineno, "trust_remote_code=True hard-coded, not from the recipe"))
    return found


def test_no_dangerous_calls_in_the_package(tally: Counter) -> None:
    files = [f for root in SCANNED if root.is_dir() for f in sorted(root.rglob("*.py"))
             if not any(part.startswith(".") for part in f.relative_to(root).parts)]  # not virtual environments
    assert len(files) > 30
    problems, used = [], set()
    for f in files:
        rel = f.relative_to(REPO).as_posix()
        for name, line, what in scan(f):
            if (rel, name) in ALLOWED:
                used.add((rel, name))
            else:
                problems.append(f"{rel}:{line}: {what}")
    tally["bad_inputs"] += len(files)
    assert not problems, "dangerous calls (add to ALLOWED only with a reason):\n" + "\n".join(problems)
    assert used == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - used}"


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The scanner itself, on a file holding each kind of dangerous call (so a broken scan cannot pass silently)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch, yaml as y, subprocess\nfrom sympy import sympify as s\nfrom pickle import loads\n"
        "from sympy.parsing.sympy_parser import parse_expr\n"
        "eval('1')\nexec('x=1')\npickle.load(f)\nloads(b'')\ntorch.load('a')\ntorch.load('a', weights_only=False)\n"
        "y.load(t)\ns('x')\nparse_expr('x')\nsubprocess.run('ls', shell=True)\n"
        "m.from_pretrained(p, trust_remote_code=True)\n"
        "torch.load('a', weights_only=True)\ny.safe_load(t)\nobj.eval()\n"
    )
    lines = sorted(line for _, line, _ in scan(bad))
    assert lines == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], scan(bad)


# ----------------------------------------------------------------------------------------- remote code
EVIL = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def test_remote_code_in_a_checkpoint_runs_only_when_the_recipe_asks(small_model: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture,
                                                                    tally: Counter) -> None:
    from vlm_sapo.models.loading import load_policy, load_processor

    marker = tmp_path / f"remote_code_ran_{uuid.uuid4().hex}"
    model = tmp_path / "model_with_custom_code"
    shutil.copytree(small_model, model)
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilConfig",
                          "AutoProcessor": "evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    tally["faults"] += 1
    with caplog.at_level(logging.WARNING, logger="vlm_sapo.models.loading"):
        load_processor(model)
        load_policy(model, device="cpu")
    assert not marker.exists(), "a checkpoint's own code ran although the recipe did not set trust_remote_code"
    assert "trust_remote_code" not in caplog.text
    # the same folder with trust_remote_code=True: the warning is logged and the code does run (so the check above
    # is not vacuous); in a subprocess, with transformers' module cache in tmp_path
    code = f"from vlm_sapo.models.loading import load_processor\ntry:\n    load_processor({str(model)!r}, " \
           "trust_remote_code=True)\nexcept Exception:\n    pass\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**run_env(uuid.uuid4().hex), "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert f"loading the processor of {model} with trust_remote_code=True" in out.stderr, out.stderr[-2000:]
    assert marker.read_text() == "remote code ran"


def test_the_trainer_passes_trust_remote_code_from_the_recipe_only() -> None:
    tree = ast.parse((REPO / "vlm_sapo" / "trainer.py").read_text())
    passed = [ast.unparse(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
              for k in node.keywords if k.arg == "trust_remote_code"]
    assert passed and set(passed) == {"r.model.trust_remote_code"}, passed


# ----------------------------------------------------------------------------------------- reward plug-ins
CANARIES = ["this", "antigravity", "os:system", "subprocess:call", "builtins:eval", "json:loads", "rewards.math",
            "vlm_sapo.trainer", "os.path:join", "pickle:loads", "importlib:import_module", "rewards/math",
            "math.py", "../../etc/passwd.py", "/dev/null", "http://example.org/r.py", "x.py:__import__", "", " "]


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from(CANARIES), st.text(max_size=30),
                 st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}(:[a-z_]{1,8})?", fullmatch=True)))
def test_rewards_load_only_from_what_the_recipe_names(tally: Counter, name: str) -> None:
    from importlib.metadata import entry_points

    from vlm_sapo.scoring import BUILTIN_REWARDS, ENTRY_POINT_GROUP

    known = set(BUILTIN_REWARDS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name.strip() in known or (name.strip().split(":")[0].endswith(".py") and Path(name.split(":")[0]).is_file()):
        return
    tally["bad_inputs"] += 1
    before = set(sys.modules)
    with pytest.raises(RewardError):
        load_reward(name)
    assert set(sys.modules) == before, f"loading reward {name!r} imported {sorted(set(sys.modules) - before)}"


# ----------------------------------------------------------------------------------------- offline
def test_offline_hub_ids_fail_fast_for_the_model_and_the_data(small_model: Path, tmp_path: Path,
                                                              tally: Counter) -> None:
    env = run_env(uuid.uuid4().hex)
    model = [*TRAIN, "model.path=Qwen/Qwen2.5-VL-3B-Instruct", f"logging.dir={tmp_path / 'a'}"]
    data = [*TRAIN, f"model.path={small_model}", "data.train.0.path=someone/no-such-dataset",
            f"logging.dir={tmp_path / 'b'}"]
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in (model, data)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    tally["faults"] += 2
    assert time.monotonic() - start < 180
    assert [p.returncode for p in procs] == [1, 1], outs
    assert ("training stopped: 'Qwen/Qwen2.5-VL-3B-Instruct' is neither a local folder nor in the Hugging Face "
            "cache, and HF_HUB_OFFLINE=1 forbids downloading it") in outs[0]
    assert ("training stopped: someone/no-such-dataset: not a local path, and loading it from the hub failed "
            "(HF_HUB_OFFLINE is set") in outs[1]
