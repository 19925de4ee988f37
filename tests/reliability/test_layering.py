"""Imports run downward only (../shared/DESIGN.md, README "Layout"): cli and the demo over trainer over eval over the
engines (rollout, learner) over data and tasks over the leaves (algos, models, recipe, checkpoint, rewards/).

Every import in the package is read from the source (function-level ones too: a lazy import is still a dependency),
so an upward import fails here, by file and line, like the security scan beside it. Two walls besides the order: the
rollout engines and the learner never import tasks or rewards (they take rendered prompts and return tokens), and
`rewards/` imports nothing of vlm_sapo, so a user's reward file looks exactly like a built-in one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# unit (first name under vlm_sapo/, or `rewards`) -> layer; higher layers may import lower and equal ones.
LAYERS: dict[str, int] = {
    # leaves
    "algos": 0, "models": 0, "recipe": 0, "checkpoint": 0, "rewards": 0, "suggest": 0, "weight_digest": 0,
    "metrics_log": 0, "resume_guard": 0, "reward_signal": 0, "faults": 0,
    # samples, prompts and scoring
    "data": 1, "tasks": 1, "reward_pool": 1, "scoring": 1,
    # the engines
    "rollout": 2, "learner": 2,
    "eval": 3,
    "trainer": 4,
    # entry points
    "cli": 5, "demo": 5,
}
WALLS: dict[str, set[str]] = {  # unit -> units it must never import, whatever their layer
    "rollout": {"tasks", "rewards", "reward_pool", "scoring"},
    "learner": {"tasks", "rewards", "reward_pool", "scoring"},
}
PACKAGE_ROOT = "vlm_sapo"  # `vlm_sapo/__init__.py` holds only the version: importing it is free


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file; `from pkg import name` also yields `pkg.name`."""
    mod = _module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "rewards":
        return "rewards"
    if parts[0] != PACKAGE_ROOT or len(parts) < 2:
        return None
    return parts[1]


def _sources() -> list[Path]:
    return sorted((ROOT / "vlm_sapo").rglob("*.py")) + sorted((ROOT / "rewards").rglob("*.py"))


def _violations(sources: list[Path], root: Path = ROOT) -> list[str]:
    bad = []
    for path in sources:
        src = _unit(_module_name(path, root))
        if src is None:
            continue
        seen: set[tuple[int, str]] = set()
        for line, target in _imports(path, root):
            dst = _unit(target)
            if dst is None or dst == src or dst not in LAYERS or (line, dst) in seen:
                continue
            seen.add((line, dst))
            where = f"{path.relative_to(root)}:{line} imports {target}"
            if src == "rewards":
                bad.append(f"{where}: rewards/ must not import vlm_sapo")
            elif dst in WALLS.get(src, set()):
                bad.append(f"{where}: {src} never imports {dst}")
            elif LAYERS[dst] > LAYERS[src]:
                bad.append(f"{where}: {src} (layer {LAYERS[src]}) imports upward into {dst} (layer {LAYERS[dst]})")
    return bad


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p, ROOT)) for p in _sources()} - {None}
    missing = sorted(u for u in units if u not in LAYERS)
    assert not missing, f"give these units a layer in {Path(__file__).name}: {missing}"


def test_imports_only_run_downward():
    bad = _violations(_sources())
    assert not bad, "upward or walled imports:\n" + "\n".join(bad)


@pytest.mark.parametrize(("unit", "code", "why"), [
    ("tasks", "from vlm_sapo.trainer import Trainer\n", "upward"),
    ("rollout", "def f():\n    from vlm_sapo.tasks import get_task\n", "never imports"),
    ("models", "from vlm_sapo import eval as e\n", "upward"),
    ("rewards", "from vlm_sapo.tasks import get_task\n", "must not import"),
])
def test_the_check_catches_a_bad_import(tmp_path, unit, code, why):
    """The scan itself, on planted files: a lazy (function-level) import and `from vlm_sapo import x` count too."""
    folder = tmp_path / ("rewards" if unit == "rewards" else f"vlm_sapo/{unit}")
    folder.mkdir(parents=True)
    planted = folder / "planted.py"
    planted.write_text(code)
    bad = _violations([planted], tmp_path)
    assert len(bad) == 1 and why in bad[0], bad
    if unit != "rewards":  # downward imports and third-party ones pass
        planted.write_text("from vlm_sapo.algos import get_policy_loss\nimport torch\n")
        assert _violations([planted], tmp_path) == []
