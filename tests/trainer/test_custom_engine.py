"""A rollout backend added from outside the package: one class and one `register_engine` line, here in the test file.

`ChunkedEngine` is a real engine: the transformers engine on its own copy of the checkpoint (so the trainer must push
the learner's weights into it after every step), generating at most `prompts_per_call` prompts per `generate` call,
an option of its own recipe section (`rollout.chunked: {prompts_per_call: 1}`). The recipe then trains with it (with
validation at the end) and `run_eval` evaluates with it, with no other file changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import PositiveInt

from vlm_sapo.metrics_log import read_metrics
from vlm_sapo.recipe import RecipeError, Strict, load_recipe
from vlm_sapo.rollout import check_rollout, list_engines, register_engine, unregister_engine
from vlm_sapo.rollout.hf_engine import HFRolloutEngine

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smoke_cpu.yaml"
FIXTURE = REPO / "tests" / "fixtures" / "geometry3k" / "rows.jsonl"
FAST = ["rollout.max_new_tokens=6", "rollout.n=2", "data.prompts_per_step=2", "algorithm.mini_batches=1",
        "logging.tensorboard=false", "logging.progress=false", "checkpoint.every_steps=0", "checkpoint.resume=never",
        "checkpoint.export_hf=false", "learner.lr=1e-3"]


class ChunkedOptions(Strict):
    prompts_per_call: PositiveInt = 1
    label: str = "chunked"


class ChunkedEngine(HFRolloutEngine):
    """The hf engine on a copy of the checkpoint, `prompts_per_call` prompts per generate call."""

    name = "chunked"
    Options = ChunkedOptions
    built: list[ChunkedEngine] = []

    @classmethod
    def build(cls, options: ChunkedOptions, ctx) -> ChunkedEngine:
        engine = cls.from_pretrained(ctx.model_path, ctx.processor, dtype=ctx.dtype,
                                     max_batch_prompts=options.prompts_per_call)
        engine.label, engine.calls = options.label, []
        cls.built.append(engine)
        return engine

    def generate(self, prompts, n, sampling):
        self.calls.append(len(prompts))
        return super().generate(prompts, n, sampling)


@pytest.fixture
def chunked():
    register_engine("chunked", ChunkedEngine)
    ChunkedEngine.built.clear()
    yield ChunkedEngine
    unregister_engine("chunked")


def _recipe(model: Path, run_dir: Path, *overrides: str):
    return load_recipe(RECIPE, [f"model.path={model}", f"logging.dir={run_dir}", *FAST, *overrides])


def test_a_registered_engine_is_listed_and_its_section_checked(chunked, tiny_qwen25_dir: Path, tmp_path: Path):
    from vlm_sapo.trainer import Trainer

    assert {"hf", "vllm", "chunked"} <= set(list_engines())
    good = _recipe(tiny_qwen25_dir, tmp_path, "rollout.backend=chunked", "rollout.chunked.prompts_per_call=2")
    check_rollout(good.rollout)
    assert good.rollout.engine_section() == {"prompts_per_call": 2}
    bad = _recipe(tiny_qwen25_dir, tmp_path, "rollout.backend=chunked", "rollout.chunked.prompts_per_cal=2",
                  "rollout.chunked.label=7")
    with pytest.raises(RecipeError) as err:
        Trainer(bad)  # refused before anything is loaded
    assert err.value.problems == [
        "`rollout.chunked.label` = 7: Input should be a valid string",
        "`rollout.chunked.prompts_per_cal` is not a field; did you mean `rollout.chunked.prompts_per_call`?"]
    with pytest.raises(RecipeError, match=r"`rollout.backend`: unknown rollout engine `chunkd` \(registered: "
                                          r"chunked, hf, vllm\); did you mean `chunked`\?"):
        Trainer(_recipe(tiny_qwen25_dir, tmp_path, "rollout.backend=chunkd"))
    assert not (tmp_path / "recipe.yaml").exists()


@pytest.mark.slow
def test_train_and_evaluate_with_a_registered_engine(chunked, tiny_qwen25_dir: Path, tmp_path: Path):
    from vlm_sapo.eval.config import EvalRun
    from vlm_sapo.eval.harness import run_eval
    from vlm_sapo.trainer import train

    recipe = _recipe(tiny_qwen25_dir, tmp_path / "run", "learner.steps=2", "rollout.backend=chunked",
                     "rollout.chunked.prompts_per_call=1", "rollout.chunked.label=mine",
                     f"data.val=[{{path: {FIXTURE}, task: math, limit: 2}}]", "eval.max_new_tokens=4")
    rows = read_metrics(train(recipe))
    assert [r["step"] for r in rows] == [1, 2]
    (engine,) = chunked.built
    assert engine.label == "mine" and not engine.shares_weights
    assert engine.calls == [2, 2, 2] and engine.weight_version == 2  # 2 steps + validation; a sync after each step
    # step 2 samples from the weights step 1 pushed in: the learner recomputes the engine's logprobs
    assert rows[1]["train/mismatch_logp_abs_diff_max"] < 1e-4
    assert "val/math/accuracy" in rows[1]

    results = run_eval(EvalRun(tiny_qwen25_dir, (f"jsonl:math:{FIXTURE}",), backend="chunked", limit=3,
                               max_new_tokens=4, engine_options={"prompts_per_call": 2}, batch_prompts=3,
                               out_dir=tmp_path / "eval", reward_workers=1, progress=False))
    (evaluator,) = chunked.built[1:]
    assert evaluator.calls == [3] and evaluator.max_batch_prompts == 2 and evaluator.label == "chunked"
    assert results.to_dict()["settings"]["backend"] == "chunked"
