"""The rollout engine registry: `rollout.backend` names an engine, `rollout.<backend>:` holds its own options.

A backend is one module and one line here (or one `register_engine` call from anywhere, e.g. a test or a plugin):

    class MyEngine:                      # generate / update_weights / sleep / wake / close, `shares_weights`
        name = "mine"
        Options = MyOptions              # a `vlm_sapo.recipe.Strict` model (the keys of `rollout.mine:`), or None

        @classmethod
        def build(cls, options: MyOptions, ctx: EngineContext) -> MyEngine: ...

    register_engine("mine", "my_package.my_engine:MyEngine")

Entries are "module:Class" strings, imported on first use (as verl's `_ROLLOUT_REGISTRY`): listing or checking the
engines never imports vLLM. The recipe (`vlm_sapo.recipe`, a leaf) cannot import the engines, so it checks only the
shape of `rollout` (its own keys; any other key must be a mapping, an engine's section); `check_rollout` checks the rest
(the backend is registered, every section names a registered engine and passes that engine's `Options`), raising
`RecipeError` naming the dotted key. The trainer calls it before it loads anything, `vlm-sapo check-recipe` with the
recipe's own checks, and `build_engine` always.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from vlm_sapo.recipe import RecipeError, RolloutCfg, Strict, describe_errors
from vlm_sapo.suggest import did_you_mean

_ENGINES: dict[str, str | type] = {
    "hf": "vlm_sapo.rollout.hf_engine:HFRolloutEngine",
    "vllm": "vlm_sapo.rollout.vllm_engine:VLLMRolloutEngine",
}


class NoOptions(Strict):
    """The options of an engine that takes none (its `Options` is None): an empty section."""


@dataclass(frozen=True)
class EngineContext:
    """What an engine is built from besides its own options: the run's model, processor and needs.

    `policy` is the learner's in-process module (None outside training): an engine may sample with it instead of a
    copy when `zero_stage` < 3 (then it `shares_weights`). `colocated` says a learner shares the accelerator.
    `max_model_len` is the longest prompt + completion the run asks for; `max_videos_per_prompt` 0 when no sample has
    a video. `max_batch_prompts` bounds the prompts per generate call (None: all at once).
    """

    model_path: str
    processor: Any
    dtype: str = "auto"
    seed: int = 0
    policy: Any = None
    zero_stage: int = 0
    colocated: bool = False
    return_routed_experts: bool = False
    max_model_len: int = 4096
    max_images_per_prompt: int = 1
    max_videos_per_prompt: int = 0
    max_batch_prompts: int | None = None


def register_engine(name: str, engine: str | type, *, replace: bool = False) -> None:
    """Register `engine` (a class or a "module:Class" string, imported on first use) as `rollout.backend: name`."""
    if not name or not name.isidentifier():
        raise ValueError(f"an engine name must be a plain identifier (it is a recipe key), got {name!r}")
    if name in RolloutCfg.model_fields:
        raise ValueError(f"`{name}` is a key of `rollout` itself; an engine needs another name (its section is "
                         f"`rollout.<name>`)")
    if name in _ENGINES and not replace and _ENGINES[name] != engine:
        raise ValueError(f"rollout engine `{name}` is already registered ({_ENGINES[name]}); pass replace=True")
    _ENGINES[name] = engine


def unregister_engine(name: str) -> None:
    _ENGINES.pop(name, None)


def list_engines() -> list[str]:
    return sorted(_ENGINES)


def _unknown(name: str, key: str = "rollout.backend") -> RecipeError:
    hint = did_you_mean(name, _ENGINES, quote=lambda s: f"`{s}`")
    return RecipeError("recipe", [f"`{key}`: unknown rollout engine `{name}` (registered: "
                                  f"{', '.join(list_engines())}){hint}"])


def engine_class(name: str) -> type:
    """The engine class registered as `name` (importing its module on first use)."""
    if name not in _ENGINES:
        raise _unknown(name)
    target = _ENGINES[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        _ENGINES[name] = target
    return target


def engine_options(name: str, section: Mapping[str, Any] | None = None, *, prefix: str | None = None) -> BaseModel:
    """Engine `name`'s options from its section (None: all defaults); errors name `<prefix>.<key>`."""
    prefix = f"rollout.{name}" if prefix is None else prefix
    schema = getattr(engine_class(name), "Options", None)
    if schema is None:
        if section:
            raise RecipeError("recipe", [f"`{prefix}`: rollout engine `{name}` takes no options, got "
                                         f"{', '.join(f'`{k}`' for k in section)}"])
        return NoOptions()
    try:
        return schema.model_validate(dict(section or {}))
    except ValidationError as e:
        raise RecipeError("recipe", describe_errors(e, prefix=prefix, schema=schema)) from None


def check_rollout(rollout: Any, source: str = "recipe") -> None:
    """Check what the recipe cannot: `rollout.backend` is a registered engine, and every engine section of `rollout`
    (its keys that are not `RolloutCfg` fields) names one and passes its `Options`. Raises `RecipeError`."""
    problems: list[str] = []
    if rollout.backend not in _ENGINES:
        problems += _unknown(rollout.backend).problems
    for key, section in rollout.engine_sections().items():
        if key not in _ENGINES:
            hint = did_you_mean(key, _ENGINES, quote=lambda s: f"`rollout.{s}`")
            problems.append(f"`rollout.{key}` is not a field, nor a registered rollout engine's section (engines: "
                            f"{', '.join(list_engines())}){hint}")
            continue
        try:
            engine_options(key, section)
        except RecipeError as e:
            problems += e.problems
    if problems:
        raise RecipeError(source, problems)


def build_engine(name: str, ctx: EngineContext, section: Mapping[str, Any] | None = None, *,
                 prefix: str | None = None) -> Any:
    """Build engine `name` from its options section and the run's context."""
    cls = engine_class(name)
    return cls.build(engine_options(name, section, prefix=prefix), ctx)
