"""No recipe key is dead: every field of the Recipe tree is read by the package, on its own section (a static scan of
vlm_sapo/, `recipe_reads.py`). An exception needs an entry in ALLOWED_UNREAD with its reason; there is none.

The scanner is checked to bite: a field added to a section and read nowhere is reported, and on a small package
written here it tells `eval.n` from `rollout.n`, a train source from a validation source, and follows a section into
the functions it is passed to. (Run on the code before this test existed, it reported `algorithm.kl_coef`,
`algorithm.kl_estimator`, `rollout.sleep_between_steps` and `data.val[].weight`.)
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from pydantic import Field

from tests.recipe.recipe_reads import ReadScanner, dotted, leaf_fields, sections, unread_fields
from vlm_sapo.recipe import LossCfg, Recipe, RolloutCfg
from vlm_sapo.rollout import engine_class, list_engines

PACKAGE = Path(__file__).resolve().parents[2] / "vlm_sapo"
RECIPE_MODULE = PACKAGE / "recipe.py"
ALLOWED_UNREAD: dict[str, str] = {}  # dotted key -> why nothing needs to read it


def test_every_recipe_field_is_read_by_the_package():
    every = {dotted(p, f) for p, f in leaf_fields(sections(Recipe))}
    assert len(every) > 90 and "rewards.functions[].label" in every and "data.train[].weight" in every
    unread = [k for k in unread_fields(Recipe, PACKAGE, RECIPE_MODULE) if k not in ALLOWED_UNREAD]
    assert not unread, f"recipe keys that nothing in vlm_sapo/ reads (a key must do what it says): {unread}"
    assert not set(ALLOWED_UNREAD) - every, "ALLOWED_UNREAD names keys that no longer exist"


def test_every_engine_section_key_is_read_by_the_package():
    """An engine's own section (`rollout.<backend>`, its `Options`) is held to the same rule."""
    for name in list_engines():
        options = engine_class(name).Options  # None: the engine takes no options
        assert options is None or unread_fields(options, PACKAGE, RECIPE_MODULE) == [], name
    vllm = engine_class("vllm").Options

    class _VLLMPlus(vllm):
        nobody_reads_this: int = 0

    assert unread_fields(_VLLMPlus, PACKAGE, RECIPE_MODULE) == ["nobody_reads_this"]


class _RolloutPlus(RolloutCfg):
    nobody_reads_this: int = 0


class _RecipePlus(Recipe):
    rollout: _RolloutPlus = Field(default_factory=_RolloutPlus)


def test_a_field_nobody_reads_is_reported():
    assert unread_fields(_RecipePlus, PACKAGE, RECIPE_MODULE) == ["rollout.nobody_reads_this"]


USE = '''
from vlm_sapo.recipe import Recipe


def f(recipe: Recipe):
    e, r = recipe.eval, recipe
    total = e.n
    for s in r.data.train:
        total += s.weight
    names = [g(v) for v in r.data.val]
    hp = r.algorithm.loss.hparams()
    return total, names, hp, r.logging


def g(cfg):
    return cfg.path


def h(other):
    return other.n, other.task, other.name  # not a section: nothing is read
'''


def test_reads_count_only_on_their_own_section(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "use.py").write_text(textwrap.dedent(USE))
    leaves = set(leaf_fields(sections(Recipe)))
    reads = {dotted(p, f) for p, f in ReadScanner(Recipe, pkg, RECIPE_MODULE).run() if (p, f) in leaves}
    loss_hparams = set(LossCfg.model_fields) - {"name"}  # LossCfg.hparams() reads them all
    assert reads == {"eval.n", "data.train[].weight", "data.val[].path"} | {
        f"algorithm.loss.{k}" for k in loss_hparams}
