"""Recipe schema: every error names its dotted key; overrides are typed; bases merge; YAML tags are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlm_sapo.cli import main
from vlm_sapo.recipe import RecipeError, apply_overrides, load_recipe, suggest_key, validate_recipe

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"name": "t", "model": {"path": "m"}, "data": {"train": [{"path": "d.jsonl", "task": "math"}]}}


def _write(tmp_path: Path, data: dict | str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _problems(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as e:
        validate_recipe(data)
    return e.value.problems


# recipes/ plus the recipes shipped as package data (the demo's, vlm_sapo/demo/demo_cpu.yaml)
SHIPPED_RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "vlm_sapo").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_say_how_to_run(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("vlm-sapo train" in first or "vlm_sapo.cli train" in first), first
    assert path.name in first or path.name in path.read_text().splitlines()[1]
    load_recipe(path)


def test_defaults_are_the_papers_sapo() -> None:
    r = validate_recipe(MINIMAL)
    assert r.algorithm.loss.name == "sapo" and r.algorithm.kl_coef == 0.0 and r.algorithm.advantage.name == "grpo"


def test_misplaced_key_gets_path_and_suggestion() -> None:
    bad = {**MINIMAL, "algorithm": {"tau_pos": 1.0}}
    assert _problems(bad) == ["`algorithm.tau_pos` is not a field; did you mean `algorithm.loss.tau_pos`?"]


def test_misspelled_key_in_list_item_keeps_its_index() -> None:
    bad = {**MINIMAL, "data": {"train": [{"path": "a", "task": "math"}, {"path": "b", "task": "chart", "wieght": 2}]}}
    assert _problems(bad) == ["`data.train[1].wieght` is not a field; did you mean `data.train[1].weight`?"]


def test_nonsense_key_gets_no_suggestion() -> None:
    assert _problems({**MINIMAL, "zzqqxx": 1}) == ["`zzqqxx` is not a field"]


def test_wrong_type_names_key_value_and_type() -> None:
    (msg,) = _problems({**MINIMAL, "learner": {"lr": "fast"}})
    assert msg.startswith("`learner.lr` = 'fast'") and "number" in msg


def test_missing_required_fields_are_all_listed() -> None:
    probs = _problems({"name": "t", "data": {"train": [{"path": "x"}]}})
    assert "`model` is required" in probs and "`data.train[0].task` is required" in probs


def test_unknown_loss_and_foreign_hparam() -> None:
    (msg,) = _problems({**MINIMAL, "algorithm": {"loss": {"name": "sapoo"}}})
    assert "unknown loss `sapoo`" in msg and "did you mean `sapo`" in msg and msg.startswith("`algorithm.loss`")
    (msg,) = _problems({**MINIMAL, "algorithm": {"loss": {"name": "grpo", "tau_pos": 2.0}}})
    assert "`tau_pos` is not a hyper-parameter of loss `grpo`" in msg


def test_gdpo_components_and_overlong_are_checked() -> None:
    gdpo = {"name": "gdpo", "components": {"accuracy": 1.0, "format": 0.5}}
    r = validate_recipe({**MINIMAL, "rollout": {"max_new_tokens": 64}, "algorithm": {"advantage": gdpo,
                                                                                  "overlong": {"filter": True}}})
    assert r.algorithm.overlong.buffer == 12  # a fifth of max_new_tokens, DAPO's 4,096 of 20,480
    # the overlong penalty becomes a GDPO component of its own (weight 1), after the listed ones
    assert r.algorithm.advantage.components == {"accuracy": 1.0, "format": 0.5, "overlong": 1.0}
    assert r.algorithm.advantage.hparams() == {"weights": (1.0, 0.5, 1.0)}
    assert _problems({**MINIMAL, "algorithm": {"advantage": {"name": "gdpo"}}}) == [
        "`algorithm.advantage`: advantage estimator `gdpo` needs `components` (reward score name -> weight, e.g. "
        "{accuracy: 1.0, format: 1.0})"]
    (msg,) = _problems({**MINIMAL, "algorithm": {"advantage": {"name": "grpo", "components": {"accuracy": 1.0}}}})
    assert "`components` applies to estimators over reward components (gdpo), not `grpo`" in msg
    (msg,) = _problems({**MINIMAL, "rollout": {"max_new_tokens": 8}, "algorithm": {"overlong": {"buffer": 9}}})
    assert msg.startswith("`algorithm.overlong.buffer` (9) exceeds `rollout.max_new_tokens` (8)")
    (msg,) = _problems({**MINIMAL, "algorithm": {"overlong": {"buffer": 0}}})
    assert "does nothing" in msg
    (msg,) = _problems({**MINIMAL, "algorithm": {"overlong": {"buffer": 0, "filter": True},
                                                 "advantage": {"name": "gdpo", "components": {"overlong": 1.0}}}})
    assert "`overlong` but `overlong.buffer` is not > 0" in msg
    assert validate_recipe({**MINIMAL, "algorithm": {"loss": {"name": "dppo_kl", "ratio_cap": 5}}})


def test_overrides_are_typed_by_the_schema(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL)
    r = load_recipe(p, ["learner.lr=3e-4", "rollout.n=4", "data.train.0.task=chart", "algorithm.loss.tau_neg=2"])
    assert r.learner.lr == pytest.approx(3e-4) and isinstance(r.learner.lr, float)
    assert r.rollout.n == 4 and r.data.train[0].task == "chart" and r.algorithm.loss.tau_neg == 2.0
    with pytest.raises(RecipeError, match="did you mean `rollout.n`"):
        load_recipe(p, ["rollout.nn=4"])
    with pytest.raises(RecipeError, match="a.b.c=value"):
        apply_overrides({}, ["novalue"])


def test_base_recipe_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    _write(tmp_path, {**MINIMAL, "rollout": {"n": 4, "temperature": 0.7}}, "base.yaml")
    child = _write(
        tmp_path, {"base": "base.yaml", "rollout": {"n": 16}, "data": {"train": [{"path": "o", "task": "chart"}]}}
    )
    r = load_recipe(child)
    assert (r.rollout.n, r.rollout.temperature) == (16, 0.7)
    assert [s.path for s in r.data.train] == ["o"]


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, {"base": "b.yaml"}, "a.yaml")
    _write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_python_yaml_tags_are_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="safe"):
        load_recipe(p)


def test_suggest_key_prefers_same_leaf() -> None:
    assert suggest_key("learner.tau_neg") == "algorithm.loss.tau_neg"
    assert suggest_key("model.min_pixel") == "model.min_pixels"


def test_check_recipe_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path, MINIMAL, "good.yaml")
    assert main(["check-recipe", str(good), "rollout.n=3"]) == 0
    assert "n: 3" in capsys.readouterr().out
    bad = _write(tmp_path, {**MINIMAL, "algorithm": {"tau_pos": 1.0}}, "bad.yaml")
    assert main(["check-recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "did you mean `algorithm.loss.tau_pos`?" in err


def test_console_script_help_lists_subcommands() -> None:
    exe = Path(sys.executable).parent / "vlm-sapo"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "check-recipe" in out and "init-tiny" in out
