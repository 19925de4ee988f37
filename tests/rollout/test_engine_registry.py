"""The rollout engine registry: names, lazy entries, and the checks of `rollout.backend` and `rollout.<backend>:`
sections (no model is loaded here; `tests/trainer/test_custom_engine.py` trains with a registered engine)."""

from __future__ import annotations

import pytest

from vlm_sapo.cli import main
from vlm_sapo.recipe import RecipeError, validate_recipe
from vlm_sapo.rollout import (
    check_rollout,
    engine_class,
    engine_options,
    list_engines,
    register_engine,
    unregister_engine,
)

MINIMAL = {"name": "t", "model": {"path": "m"}, "data": {"train": [{"path": "d.jsonl", "task": "math"}]}}


def _rollout(**rollout):
    return validate_recipe({**MINIMAL, "rollout": rollout}).rollout


def test_builtin_engines_are_registered_lazily():
    assert list_engines()[:2] == ["hf", "vllm"]
    cls = engine_class("vllm")  # imports the module, not vLLM itself
    assert cls.__name__ == "VLLMRolloutEngine" and cls.shares_weights is False
    assert engine_options("vllm").model_dump() == {"gpu_memory_utilization": None, "cpu_kvcache_gib": 1.0,
                                                   "max_model_len": None, "enforce_eager": False}
    assert engine_options("hf").model_dump() == {}


def test_register_engine_refuses_bad_names_and_silent_replacement():
    with pytest.raises(ValueError, match="plain identifier"):
        register_engine("my-engine", "x:Y")
    with pytest.raises(ValueError, match="is a key of `rollout` itself"):
        register_engine("temperature", "x:Y")
    with pytest.raises(ValueError, match="already registered"):
        register_engine("hf", "somewhere:Else")
    register_engine("later", "no_such_module:Engine")  # a string is imported only when used
    try:
        assert "later" in list_engines()
        with pytest.raises(ModuleNotFoundError):
            engine_class("later")
    finally:
        unregister_engine("later")


def test_engine_sections_are_checked_by_their_engine():
    r = _rollout(backend="vllm", vllm={"gpu_memory_utilization": 0.6}, hf={})
    check_rollout(r)
    assert r.engine_section() == {"gpu_memory_utilization": 0.6} and set(r.engine_sections()) == {"vllm", "hf"}
    assert _rollout(backend="hf").engine_section() == {}
    with pytest.raises(RecipeError) as err:
        check_rollout(_rollout(backend="vlm", vlm={"x": 1}, vllm={"gpu_memory_utilisation": 0.3,
                                                                   "cpu_kvcache_gib": -1}))
    assert err.value.problems == [
        "`rollout.backend`: unknown rollout engine `vlm` (registered: hf, vllm); did you mean `vllm`?",
        "`rollout.vlm` is not a field, nor a registered rollout engine's section (engines: hf, vllm); did you mean "
        "`rollout.vllm`?",
        "`rollout.vllm.cpu_kvcache_gib` = -1: Input should be greater than 0",
        "`rollout.vllm.gpu_memory_utilisation` is not a field; did you mean `rollout.vllm.gpu_memory_utilization`?"]


def test_a_flat_engine_key_is_not_a_rollout_field():
    with pytest.raises(RecipeError) as err:
        _rollout(backend="vllm", gpu_memory_utilization=0.6)
    assert err.value.problems == ["`rollout.gpu_memory_utilization` is not a field (an engine's own options go in its "
                                  "section, `rollout.<backend>.gpu_memory_utilization`)"]
    with pytest.raises(RecipeError) as err:
        _rollout(nn=4)
    assert err.value.problems == ["`rollout.nn` is not a field; did you mean `rollout.n`?"]


def test_check_recipe_cli_runs_the_engine_checks(tmp_path, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "rollout": {"backend": "vllm", "vllm": {"enforce_eager": True}}}))
    assert main(["check-recipe", str(path)]) == 0
    assert "vllm: {enforce_eager: true}" in capsys.readouterr().out
    assert main(["check-recipe", str(path), "rollout.vllm.enforce_eagr=true"]) == 2
    assert "did you mean `rollout.vllm.enforce_eager`?" in capsys.readouterr().err
    assert main(["check-recipe", str(path), "rollout.backend=hff"]) == 2
    assert "`rollout.backend`: unknown rollout engine `hff`" in capsys.readouterr().err
