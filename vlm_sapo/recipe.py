"""Typed, validated YAML recipes.

A recipe is the whole run in one file. Every section forbids unknown keys, so a typo fails loudly with its dotted path
and the closest valid key instead of silently training with a default. YAML is read with ``yaml.safe_load`` only
(``!!python/object`` tags are refused). A recipe may extend another (``base: other.yaml``; mappings merge, lists and
scalars replace), and ``a.b.c=value`` overrides from the command line are typed by the schema.

One module (just over 500 lines) on purpose: the schema reads top to bottom as a recipe file does. Rollout engines'
own sections (``rollout.<backend>:``) are declared by the engines and checked by ``vlm_sapo.rollout.check_rollout``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from vlm_sapo.suggest import did_you_mean


class RecipeError(ValueError):
    """A recipe that cannot be used; ``problems`` holds one line per error, each naming its dotted key."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe:\n" + "\n".join(f"  - {p}" for p in problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ----------------------------------------------------------------------------------------------------------- sections
class LoraCfg(Strict):
    rank: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelCfg(Strict):
    path: str = Field(description="local folder (or a hub id where the hub is reachable)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    freeze_vision_tower: bool = False
    lora: LoraCfg | None = None
    min_pixels: PositiveInt = 3136  # 4 * 28 * 28
    max_pixels: PositiveInt = 1_003_520  # 1280 * 28 * 28
    video_min_pixels: PositiveInt = 3136  # per video frame
    video_max_pixels: PositiveInt = 100_352  # per video frame: 128 * 28 * 28, qwen-vl-utils' smallest video default

    @model_validator(mode="after")
    def _pixels(self) -> ModelCfg:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        if self.video_min_pixels > self.video_max_pixels:
            raise ValueError(f"video_min_pixels ({self.video_min_pixels}) must not exceed video_max_pixels "
                             f"({self.video_max_pixels})")
        return self


class DataSourceCfg(Strict):
    """A validation source (`data.val[i]`); training sources add their mixing weight."""

    path: str = Field(description="JSON lines, Parquet, a datasets folder, or a benchmark name")
    task: str = Field(description="task name (math, grounding, chart, or a registered one)")
    split: str | None = None
    columns: dict[str, str] = {}  # project field -> column in the source
    image_root: str | None = None
    limit: PositiveInt | None = None


class TrainSourceCfg(DataSourceCfg):
    weight: PositiveFloat = 1.0  # share of this source in each batch when tasks are mixed


class DataCfg(Strict):
    train: list[TrainSourceCfg] = Field(min_length=1)
    val: list[DataSourceCfg] = []  # no `weight`: validation sources are not mixed, each is scored whole
    prompts_per_step: PositiveInt = 8
    max_prompt_tokens: PositiveInt = 2048
    on_bad_row: Literal["fail", "skip"] = "fail"
    on_long_prompt: Literal["drop", "fail"] = "drop"
    max_image_pixels: PositiveInt = 64_000_000  # decompression-bomb guard, checked on the header before decoding
    max_aspect_ratio: PositiveFloat = 200.0
    video_max_frames: int = Field(16, ge=2)  # frames kept per video (a longer frame list is thinned evenly)
    video_fps: PositiveFloat = 2.0  # a video file is sampled at this rate; a frame list is taken as sampled at it
    shuffle: bool = True
    system_prompt: str | None = None
    coord_system: Literal["auto", "abs_resized", "rel1000", "abs_original"] = "auto"  # auto: from the model family


class RolloutCfg(Strict):
    """The rollout section: what every engine shares. An engine's own options go in a section named after it
    (`rollout.vllm: {gpu_memory_utilization: 0.6}`): any key here that is not a field must be such a mapping. Which
    engines exist, and what their sections hold, is the engine registry's to check (`vlm_sapo.rollout.check_rollout`:
    this leaf module cannot import the engines)."""

    model_config = ConfigDict(extra="allow", validate_default=True)
    __pydantic_extra__: dict[str, dict[str, Any]]  # engine sections, by engine name

    backend: str = "hf"  # a registered rollout engine: hf, vllm (`vlm_sapo.rollout.list_engines()`)
    n: PositiveInt = Field(8, description="completions per prompt (G)")
    temperature: PositiveFloat = 1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1: off
    max_new_tokens: PositiveInt = 512
    stop: list[str] = []
    sleep_between_steps: bool = True
    on_engine_death: Literal["fail", "restart"] = "fail"

    def engine_sections(self) -> dict[str, dict[str, Any]]:
        """Every engine section of the recipe (the chosen backend's and any other's), by engine name."""
        return dict(self.model_extra or {})

    def engine_section(self) -> dict[str, Any]:
        """The chosen backend's own options (`rollout.<backend>`), empty when the recipe has none."""
        return dict((self.model_extra or {}).get(self.backend) or {})


class LossCfg(Strict):
    """Loss name plus its hyper-parameters; unset ones take the loss function's own defaults."""

    name: str = "sapo"
    tau_pos: PositiveFloat | None = None
    tau_neg: PositiveFloat | None = None
    clip_low: NonNegativeFloat | None = None
    clip_high: NonNegativeFloat | None = None
    max_log_ratio: PositiveFloat | None = None
    max_length: PositiveInt | None = None
    ratio_cap: PositiveFloat | None = None  # dppo_tv / dppo_kl: cap of the importance weight

    def hparams(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}

    @model_validator(mode="after")
    def _known(self) -> LossCfg:
        from vlm_sapo.algos import get_policy_loss, list_policy_losses

        _check_registered(self.name, list_policy_losses(), "loss")
        _check_hparams(get_policy_loss(self.name), self.hparams(), f"loss `{self.name}`")
        return self


class AdvantageCfg(Strict):
    name: str = "grpo"
    epsilon: PositiveFloat | None = None
    scale_std: bool | None = None
    # gdpo: reward score name -> weight. `accuracy` matches every reward's `<label>/accuracy`, `math/format` one
    # reward's; a score a sample lacks counts 0. `overlong` is the overlong penalty (added with weight 1 if absent).
    components: dict[str, float] | None = None

    def hparams(self) -> dict[str, Any]:
        out = {k: v for k, v in self.model_dump(exclude={"name", "components"}).items() if v is not None}
        if self.components:
            out["weights"] = tuple(self.components.values())
        return out

    @model_validator(mode="after")
    def _known(self) -> AdvantageCfg:
        from vlm_sapo.algos import get_advantage_estimator, list_advantage_estimators, takes_components

        _check_registered(self.name, list_advantage_estimators(), "advantage estimator")
        if takes_components(self.name) and not self.components:
            raise ValueError(f"advantage estimator `{self.name}` needs `components` (reward score name -> weight, "
                             "e.g. {accuracy: 1.0, format: 1.0})")
        if self.components is not None and not takes_components(self.name):
            raise ValueError(f"`components` applies to estimators over reward components (gdpo), not `{self.name}`")
        bad = {k: v for k, v in (self.components or {}).items() if not k.strip() or not math.isfinite(v)}
        if bad:
            raise ValueError(f"`components` needs non-empty names and finite weights, got {bad}")
        _check_hparams(get_advantage_estimator(self.name), self.hparams(), f"advantage estimator `{self.name}`")
        return self


class OverlongCfg(Strict):
    """DAPO's overlong reward shaping and filtering (arXiv:2503.14476); see `vlm_sapo.algos.overlong`."""

    # L_cache: the last `buffer` tokens before rollout.max_new_tokens are penalised; 0: no penalty; None: a fifth of
    # rollout.max_new_tokens (DAPO's 4,096 of 20,480)
    buffer: NonNegativeInt | None = None
    penalty_factor: PositiveFloat = 1.0  # the penalty at max_new_tokens is -penalty_factor
    filter: bool = False  # mask truncated completions (finish reason "length") out of the loss


class AlgorithmCfg(Strict):
    loss: LossCfg = Field(default_factory=LossCfg)
    advantage: AdvantageCfg = Field(default_factory=AdvantageCfg)
    mini_batches: PositiveInt = Field(1, description="updates per rollout batch (the paper's off-policy setting: 4)")
    zero_variance_groups: Literal["keep", "drop", "resample"] = "drop"  # DAPO's dynamic sampling
    max_resample_rounds: NonNegativeInt = 2
    kl_coef: NonNegativeFloat = 0.0  # off by default, as in the SAPO paper
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    tis_cap: PositiveFloat | None = None  # truncated importance sampling for train/rollout mismatch; None: off
    # MoE policies only: r2 replays the learner's old-policy experts in every update, r3 the rollout engine's
    # (in the old-policy pass too); see vlm_sapo/models/routing.py
    routing_replay: Literal["none", "r2", "r3"] = "none"
    overlong: OverlongCfg | None = None  # None: off

    @model_validator(mode="after")
    def _overlong(self) -> AlgorithmCfg:
        o, comps = self.overlong, self.advantage.components
        if o is not None and o.buffer == 0 and not o.filter:
            raise ValueError("`overlong` does nothing with `buffer: 0` and `filter: false`")
        shaping = o is not None and o.buffer != 0
        if comps is not None and "overlong" in comps and not shaping:
            raise ValueError("`advantage.components` has `overlong` but `overlong.buffer` is not > 0 (no penalty)")
        if comps is not None and shaping and "overlong" not in comps:
            self.advantage.components = {**comps, "overlong": 1.0}  # the penalty is a reward component of its own
        return self


class LearnerCfg(Strict):
    steps: PositiveInt = 100
    lr: PositiveFloat = 1e-6
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: NonNegativeInt = 0
    weight_decay: NonNegativeFloat = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: PositiveFloat | None = 1.0
    micro_batch_tokens: PositiveInt = 8192
    zero_stage: Literal[1, 2, 3] = 2  # stage 0 has no non-finite step skip
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged over the generated config
    max_nonfinite_in_a_row: PositiveInt = 3
    logprob_chunk_size: PositiveInt = 1024


class RewardFnCfg(Strict):
    name: str = Field(description="registry name, path/to/file.py:function, or an entry point in vlm_sapo.rewards")
    weight: float = 1.0
    tasks: list[str] | None = None  # only samples of these tasks; None: every task
    kwargs: dict[str, Any] = {}
    # prefix of its logged scores (reward/<task>/<label>/...); default: the reward's name or file stem. Two entries
    # of the same reward (e.g. with different kwargs) need distinct labels.
    label: str | None = Field(None, pattern=r"^[^/\s]+$")


class RewardsCfg(Strict):
    functions: list[RewardFnCfg] = []  # empty: each sample gets its task's own reward
    workers: PositiveInt = 2
    timeout_s: PositiveFloat = 10.0


class EvalCfg(Strict):
    benchmarks: list[str] = []  # names as `vlm-sapo eval --benchmarks` takes them (NAME, NAME=SOURCE, NAME:SPLIT)
    data_root: str | None = None  # a folder holding benchmark folders (e.g. ../shared/data)
    every_steps: NonNegativeInt = 0  # 0: only at the end (if at_end)
    at_end: bool = True
    limit: PositiveInt | None = None
    n: PositiveInt = 1
    temperature: NonNegativeFloat = 0.0
    max_new_tokens: PositiveInt | None = None  # None: rollout.max_new_tokens


class LoggingCfg(Strict):
    dir: str = "runs/{name}"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "vlm_sapo"
    progress: bool = True


class CheckpointCfg(Strict):
    every_steps: NonNegativeInt = 50  # 0: never
    keep_last: PositiveInt = 2
    resume: str = "auto"  # auto | never | force (auto, even under a changed recipe) | a checkpoint folder
    export_hf: bool = True


class Recipe(Strict):
    name: str
    seed: int = 0
    model: ModelCfg
    data: DataCfg
    rollout: RolloutCfg = Field(default_factory=RolloutCfg)
    algorithm: AlgorithmCfg = Field(default_factory=AlgorithmCfg)
    learner: LearnerCfg = Field(default_factory=LearnerCfg)
    rewards: RewardsCfg = Field(default_factory=RewardsCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    logging: LoggingCfg = Field(default_factory=LoggingCfg)
    checkpoint: CheckpointCfg = Field(default_factory=CheckpointCfg)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("name must be a non-empty plain word (it names the run folder)")
        return v

    @model_validator(mode="after")
    def _overlong_buffer(self) -> Recipe:
        o = self.algorithm.overlong
        if o is not None and o.buffer is None:
            o.buffer = max(1, self.rollout.max_new_tokens // 5)
        if o is not None and o.buffer > self.rollout.max_new_tokens:
            raise ValueError(f"`algorithm.overlong.buffer` ({o.buffer}) exceeds `rollout.max_new_tokens` "
                             f"({self.rollout.max_new_tokens}): the penalty starts at max_new_tokens - buffer")
        return self


# ------------------------------------------------------------------------------------------------- name validation
def _check_registered(name: str, valid: list[str], what: str) -> None:
    if name not in valid:
        hint = did_you_mean(name, valid, quote=lambda s: f"`{s}`")
        raise ValueError(f"unknown {what} `{name}` (valid: {', '.join(sorted(valid))}){hint}")


def _check_hparams(fn: Any, hparams: dict[str, Any], what: str) -> None:
    accepted = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in hparams:
        if key not in accepted:
            raise ValueError(f"`{key}` is not a hyper-parameter of {what} (it takes: {', '.join(accepted) or 'none'})")


# ---------------------------------------------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(str(path), [f"cannot read the recipe: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [f"not valid (safe) YAML: {e}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"the top level must be a mapping, got {type(data).__name__}"])
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe's mapping with its ``base`` chain merged in (the base's own ``base`` first)."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(str(path), ["`base` chain has a cycle: " + " -> ".join(str(p) for p in (*_seen, path))])
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(str(path), [f"`base` must be a path to another recipe, got {base!r}"])
    return _merge(load_raw(path.parent / base, (*_seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists, then typed by the schema."""
    out = _merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError("command line", [f"override `{item}` must look like a.b.c=value"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().replace("[", ".").replace("]", "").split(".")
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError("command line", [f"override `{key}`: `{part}` is not an index of that list"])
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError("command line", [f"override `{key}`: `{'.'.join(parts[:i])}` is not a mapping"])
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge ``base``, apply overrides and validate. Raises ``RecipeError`` listing every problem."""
    data = apply_overrides(load_raw(path), overrides or [])
    return validate_recipe(data, source=str(path))


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(source, describe_errors(e)) from None


def describe_errors(error: ValidationError, *, prefix: str = "", schema: type[BaseModel] | None = None) -> list[str]:
    """One line per error of validating `schema` (default: the recipe) at `prefix`, each naming its dotted key."""
    return [_describe(err, prefix, schema or Recipe) for err in error.errors()]


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=120)


# ------------------------------------------------------------------------------------------------ error messages
def _hint(path: str, schema: type[BaseModel] | None, prefix: str) -> str:
    best = suggest_key(path, schema, prefix)
    return f"; did you mean `{best}`?" if best else ""


def _is_engine_section(path: str, schema: type[BaseModel] | None) -> bool:
    """`rollout.<key>` for a key that is not a field of `rollout` (only engine sections may stand there)."""
    parent, _, leaf = path.rpartition(".")
    return (schema in (None, Recipe) and parent == "rollout" and leaf not in RolloutCfg.model_fields)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith("function-") or part in ("list", "dict", "tuple")):
            continue  # pydantic's internal validator names, not keys
        else:
            out += ("." if out else "") + str(part)
    return out


def _schema_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts; list items appear as ``[]``."""
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        paths.append(path)
        ann = field.annotation
        for sub in (ann, *get_args(ann)):
            if get_origin(sub) is list and get_args(sub) and isinstance(get_args(sub)[0], type):
                item = get_args(sub)[0]
                if issubclass(item, BaseModel):
                    paths += _schema_paths(item, path + "[]")
            elif isinstance(sub, type) and issubclass(sub, BaseModel):
                paths += _schema_paths(sub, path)
    return paths


def _strip_indices(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def suggest_key(bad_path: str, schema: type[BaseModel] | None = None, prefix: str = "") -> str | None:
    """The valid key closest to a misspelled or misplaced one: same leaf name anywhere first, then spelling."""
    paths = _schema_paths(schema or Recipe, prefix)
    plain = _strip_indices(bad_path)
    leaf = plain.rsplit(".", 1)[-1]
    parent = plain.rsplit(".", 1)[0] if "." in plain else ""

    def leaf_of(p: str) -> str:
        return p.rsplit(".", 1)[-1].split("[")[0]

    def score(p: str) -> tuple[float, float]:
        p_parent = p.rsplit(".", 1)[0] if "." in p else ""
        return (
            difflib.SequenceMatcher(None, leaf, leaf_of(p)).ratio(),
            difflib.SequenceMatcher(None, parent, p_parent).ratio(),
        )

    best = max(paths, key=score)
    if score(best)[0] < 0.6:
        return None
    # put the bad path's list indices back where the prefixes agree
    indices = iter(re.findall(r"\[\d+\]", bad_path))
    return re.sub(r"\[\]", lambda _: next(indices, "[0]"), best)


def _describe(err: dict[str, Any], prefix: str = "", schema: type[BaseModel] | None = None) -> str:
    path = ".".join(p for p in (prefix, _dotted(err["loc"])) if p)
    kind = err["type"]
    if kind == "dict_type" and _is_engine_section(path, schema):  # a scalar where only engine sections may be
        hint = _hint(path, schema, prefix)
        return f"`{path}` is not a field" + (hint or " (an engine's own options go in its section, "
                                             f"`rollout.<backend>.{path.rsplit('.', 1)[-1]}`)")
    if kind == "extra_forbidden":
        return f"`{path}` is not a field" + _hint(path, schema, prefix)
    if kind == "missing":
        return f"`{path}` is required"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" or "input" not in err:
        return f"`{path}`: {msg}" if path else msg
    return f"`{path}` = {err['input']!r}: {msg}"
