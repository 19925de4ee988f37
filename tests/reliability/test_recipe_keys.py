"""Every key of the recipe schema, mutated: a misspelling, a wrong type or a missing required field gives one clear
error naming the dotted path. The keys are walked from the pydantic models here, independently of `vlm_sapo.recipe`'s
own key listing, so a new section is covered as soon as it exists. YAML tags that construct Python objects are refused
wherever YAML is read (recipe, base recipe, command-line override), and nothing they name ever runs.
"""

from __future__ import annotations

import copy
import types
import typing
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from vlm_sapo.recipe import Recipe, RecipeError, load_recipe, validate_recipe

# A valid recipe holding one item of every list of sections, so every nested key exists somewhere.
FULL: dict[str, Any] = {
    "name": "t",
    "model": {"path": "m", "lora": {}},
    "data": {"train": [{"path": "d.jsonl", "task": "math"}], "val": [{"path": "v.jsonl", "task": "chart"}]},
    "rewards": {"functions": [{"name": "math"}]},
}
WRONG_VALUES = [{"zz": {"y": 1}}, ["zz"], "zz-not-valid", -7, 1.5]
# Sections whose keys are checked against a registry by the section's own validator (the loss name, and the
# hyper-parameters the chosen loss takes): the error names the section and the key or quotes the value
# ("`algorithm.loss`: unknown loss `zz`"). Known gap, reported: field validators would name the key's full path.
CHECKED_BY_SECTION = {"algorithm.loss", "algorithm.advantage"}


def _models_in(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    """The section models an annotation holds, and whether they sit inside a list."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], False
    if origin is list:
        inner, _ = _models_in(args[0]) if args else ([], False)
        return inner, True
    if origin in (typing.Union, types.UnionType):
        found = [_models_in(a) for a in args]
        return [m for ms, _ in found for m in ms], any(in_list for _, in_list in found)
    return [], False


def schema_keys(model: type[BaseModel] = Recipe, prefix: tuple = (), data: Any = FULL
                ) -> list[tuple[tuple, bool, bool]]:
    """(location, required, is a section) for every field; a location is a tuple of keys and list indices."""
    out = []
    for name, field in model.model_fields.items():
        loc = (*prefix, name)
        models, in_list = _models_in(field.annotation)
        out.append((loc, field.is_required(), bool(models) and not in_list))
        if not models:
            continue
        value = data.get(name) if isinstance(data, dict) else None
        if in_list:
            assert value, f"FULL has no item for the list of sections `{dotted(loc)}`: add one so its keys are tested"
            out += schema_keys(models[0], (*loc, 0), value[0])
        else:  # a section left out of FULL takes its defaults; a key set inside it creates it
            out += schema_keys(models[0], loc, value if isinstance(value, dict) else {})
    return out


def dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + part
    return text


def _parent(data: dict, loc: tuple) -> Any:
    node = data
    for part in loc[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    return node


def _problems(data: dict) -> list[str] | None:
    try:
        validate_recipe(data)
    except RecipeError as err:
        return err.problems
    return None


KEYS = schema_keys()


def test_the_walk_covers_the_whole_schema() -> None:
    assert validate_recipe(FULL)
    names = {dotted(loc) for loc, _, _ in KEYS}
    assert {"model.lora.rank", "data.train[0].columns", "rewards.functions[0].kwargs", "algorithm.loss.tau_pos",
            "learner.max_nonfinite_in_a_row", "rollout.on_engine_death", "checkpoint.resume"} <= names
    assert len(names) > 80


@pytest.mark.parametrize("loc", [loc for loc, required, _ in KEYS if required], ids=dotted)
def test_missing_required_field_is_named(loc: tuple, tally: Counter) -> None:
    data = copy.deepcopy(FULL)
    del _parent(data, loc)[loc[-1]]
    tally["bad_inputs"] += 1
    assert _problems(data) == [f"`{dotted(loc)}` is required"]


def _names(problem: str, loc: tuple, wrong: Any) -> bool:
    """The problem names the key by its dotted path (or, for CHECKED_BY_SECTION, its section plus the key or value)."""
    if problem.startswith(f"`{dotted(loc)}"):
        return True
    section = dotted(loc[:-1])
    return (section in CHECKED_BY_SECTION and problem.startswith(f"`{section}`:")
            and (f"`{loc[-1]}`" in problem or f"`{wrong}`" in problem))


def test_every_key_rejects_a_wrong_type_with_one_error_naming_it(tally: Counter) -> None:
    untyped = []
    for loc, _, section in KEYS:
        rejected = 0
        for wrong in WRONG_VALUES[1:] if section else WRONG_VALUES:  # a mapping is a section's own type
            data = copy.deepcopy(FULL)
            _parent(data, loc)[loc[-1]] = wrong
            tally["bad_inputs"] += 1
            problems = _problems(data)
            if problems is None:
                continue
            rejected += 1
            assert all(_names(p, loc, wrong) for p in problems), (dotted(loc), wrong, problems)
            # one line, except a tuple that is both wrong and short: `learner.betas[0]` = 'zz' ..., `[1]` is required
            assert len(problems) == 1 or all(p.startswith(f"`{dotted(loc)}[") for p in problems), problems
        if not rejected:
            untyped.append(dotted(loc))
    assert not untyped, f"keys that accept every wrong value tried: {untyped}"


def _misspell(name: str, kind: int, at: int, char: str) -> str:
    at %= len(name)
    if kind == 0 and len(name) > 1:
        return name[:at] + name[at + 1:]  # a letter dropped
    if kind == 1:
        return name[:at] + char + name[at:]  # a letter added
    if kind == 2 and len(name) > 1:
        i = min(at, len(name) - 2)
        return name[:i] + name[i + 1] + name[i] + name[i + 2:]  # two letters swapped
    return name[:at] + char + name[at + 1:]  # a letter replaced


@settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_every_misspelled_key_is_named_with_its_path(tally: Counter, data: st.DataObject) -> None:
    for loc, required, _ in KEYS:
        leaf = loc[-1]
        bad = _misspell(leaf, data.draw(st.integers(0, 3)), data.draw(st.integers(0, 50)),
                        data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_0")))
        recipe = copy.deepcopy(FULL)
        parent = _parent(recipe, loc)
        siblings = {other[-1] for other, _, _ in KEYS if other[:-1] == loc[:-1]}
        if bad in siblings or bad == leaf:  # the edit made another valid key
            continue
        if leaf in parent:
            parent[bad] = parent.pop(leaf)
        else:
            parent[bad] = copy.deepcopy(FULL.get(leaf, 1))
        tally["bad_inputs"] += 1
        problems = _problems(recipe)
        bad_path = dotted((*loc[:-1], bad))
        assert problems, f"misspelled `{bad_path}` was accepted"
        named = [p for p in problems if p.startswith(f"`{bad_path}` is not a field")]
        rest = [p for p in problems if p not in named]
        assert len(named) == 1, (bad_path, problems)
        assert rest == ([f"`{dotted(loc)}` is required"] if required else []), (bad_path, problems)


# -------------------------------------------------------------------------------------------------- YAML tags
def _tags(marker: Path) -> list[str]:
    cmd = f"touch {marker}"
    return [f"!!python/object/apply:os.system ['{cmd}']", f"!!python/object/new:os.system ['{cmd}']",
            "!!python/name:os.system", "!!python/module:os",
            f"!!python/object/apply:subprocess.call [['touch', '{marker}']]"]


@pytest.mark.parametrize("where", ["recipe", "base", "nested"])
def test_python_tags_are_refused_in_recipes_and_bases(tmp_path: Path, tally: Counter, where: str) -> None:
    marker = tmp_path / f"pwned_{uuid.uuid4().hex}"
    for tag in _tags(marker):
        good = yaml.safe_dump(FULL)
        if where == "recipe":
            text, base = f"name: {tag}\n" + good.replace("name: t\n", ""), None
        elif where == "base":
            text, base = "base: base.yaml\nname: t\n", f"seed: {tag}\n" + good
        else:
            text, base = good.replace("path: m", f"path: {tag}"), None
        if base is not None:
            (tmp_path / "base.yaml").write_text(base)
        (tmp_path / "r.yaml").write_text(text)
        tally["bad_inputs"] += 1
        with pytest.raises(RecipeError, match=r"not valid \(safe\) YAML") as err:
            load_recipe(tmp_path / "r.yaml")
        assert "python/" in str(err.value)
    assert not marker.exists()


def test_python_tags_in_overrides_stay_plain_text(tmp_path: Path, tally: Counter) -> None:
    marker = tmp_path / f"pwned_{uuid.uuid4().hex}"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(FULL))
    for tag in _tags(marker):
        tally["bad_inputs"] += 2
        assert load_recipe(path, [f"model.path={tag}"]).model.path == tag  # a string, never an object
        with pytest.raises(RecipeError, match=r"`learner.lr` = .!!python"):
            load_recipe(path, [f"learner.lr={tag}"])
    assert not marker.exists()
