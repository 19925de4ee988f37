"""`pip install .` (not editable) carries everything the demo needs: from another folder, with only the installed copy
of vlm_sapo on the path, `python -m vlm_sapo.demo --help` runs and the recipe shipped as package data loads.

pip builds from a copy of the sources (pyproject.toml, README.md, vlm_sapo/, rewards/), so that the build's `build/`
and `*.egg-info` never land in the checkout; offline (`--no-index`, `--no-build-isolation`: the venv's setuptools
builds it). About 15 s on 2 busy cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "vlm_sapo", "rewards")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder `pip install --target` filled from a copy of this checkout."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return site


def _run_elsewhere(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # Only the installed copy on the path (not this checkout, whatever PYTHONPATH the suite runs under); the venv's
    # site-packages still provide the dependencies.
    env = {**os.environ, "PYTHONPATH": str(site), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_installed_package_holds_the_demo_recipe(installed: Path) -> None:
    packaged = installed / "vlm_sapo" / "demo" / "demo_cpu.yaml"
    assert packaged.is_file(), sorted(p.name for p in (installed / "vlm_sapo" / "demo").iterdir())
    assert packaged.read_bytes() == (REPO / "vlm_sapo" / "demo" / "demo_cpu.yaml").read_bytes()
    assert not (REPO / "recipes" / "demo_cpu.yaml").exists(), "the demo recipe has one copy: vlm_sapo/demo/demo_cpu.yaml"


def test_demo_help_and_recipe_from_a_non_editable_install(installed: Path, tmp_path: Path) -> None:
    proc = _run_elsewhere(installed, tmp_path, "-m", "vlm_sapo.demo", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m vlm_sapo.demo") and "--seeds" in proc.stdout, proc.stdout

    check = ("import vlm_sapo, vlm_sapo.demo as demo\n"
             "from vlm_sapo.recipe import load_recipe\n"
             "r = load_recipe(demo.RECIPE)\n"
             "print(vlm_sapo.__file__); print(demo.RECIPE); print(r.name, r.rollout.backend, r.learner.steps)\n")
    proc = _run_elsewhere(installed, tmp_path, "-c", check)
    assert proc.returncode == 0, proc.stderr
    package_file, recipe, summary = proc.stdout.splitlines()
    assert Path(package_file).resolve().is_relative_to(installed.resolve()), package_file
    assert Path(recipe).resolve() == (installed / "vlm_sapo" / "demo" / "demo_cpu.yaml").resolve()
    assert summary == "demo hf 120", summary
