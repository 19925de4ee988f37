"""Synthetic task families with exact answers, one generator each: counting arithmetic (math), bar charts (chart),
finding a described shape (grounding), and one video family: which way a shape moves (motion, `synthetic.motion`).

Each generator draws one scene from a `random.Random` and returns a `SyntheticItem`; its `key` names the scene up to
pixel jitter, so that train, validation and test splits can be kept disjoint by content, not just by row. Difficulty is
set by `SyntheticConfig`; its defaults were measured to suit the CPU demo's tiny model (see `vlm_sapo/demo/pipeline.py`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vlm_sapo.demo.synthetic.motion import make_motion
from vlm_sapo.demo.synthetic.shapes import BACKGROUND, COLOURS, SHAPES, Shape, draw_shapes, shape_in_cell
from vlm_sapo.tasks.answers import answer_key

FAMILIES = ("math", "chart", "grounding")


CELL = 28  # pixels: Qwen2/2.5-VL turn each 28 x 28 pixels into one image token, so a grid cell is one token


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and answer ranges. Every family's answers are drawn balanced (see `answer_classes`): a policy that does
    not look at the image scores at most about one over the number of answers."""

    grid: int = 2  # grounding: cells per side (one object at most per cell)
    math_grid: int = 3  # math: cells per side; a 3 x 3 grid leaves enough distinct scenes for every count
    colours: tuple[str, ...] = ("red", "blue", "green", "yellow")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    shape_side: int = 16  # a square's side; circles and triangles are sized to the same area (see `shape_sizes`)
    jitter: int = 2  # math: largest shift of a shape from its cell's centre, pixels
    grounding_jitter: int = 0  # grounding: none, so each (cell, shape) has one box and answers can be balanced
    math_questions: tuple[str, ...] = ("shapes",)
    math_counts: tuple[int, int] = (2, 6)  # the answers of "how many shapes", balanced
    chart_side: int = 84  # pixels; three bars, each in its own column of image tokens
    bars: int = 3  # bars per chart
    bar_max: int = 6  # bar values are 1..bar_max
    chart_answers: tuple[int, int] = (3, 6)  # the largest values asked for, balanced
    chart_questions: tuple[str, ...] = ("max",)
    grounding_objects: tuple[int, int] = (2, 2)  # objects per grounding scene, the target included
    grounding_same_colour: bool = False  # distractors may share the target's colour (then its shape tells it apart)
    # Grounding cells are shaded, one grey per cell: a Qwen-VL vision token's features say what is in its 28 pixels but
    # not where they are (the vision tower has no absolute positions), so without a cue the tiny model cannot tell the
    # cells apart (measured: it never located even a lone shape in 400 supervised steps).
    grounding_shades: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (200, 200, 200), (145, 145, 145),
                                                          (90, 90, 90))
    # Families whose question is written before its image (an `<image>` placeholder after it, see
    # `vlm_sapo.data.prompts.user_content`), so that the image tokens can attend to the question. Grounding needs it
    # (which cell holds the named shape?); math and chart ask one fixed question and do not. Measured on the demo
    # (README "The demo", seeds 0-4): grounding after RL 36.2% [32.0, 45.0] with the image first, 40.9% [29.0, 48.5]
    # with the question first.
    question_first: tuple[str, ...] = ("grounding",)
    motion_side: int = 56  # pixels of each motion frame
    motion_frames: int = 4  # frames per motion video
    motion_step: tuple[int, int] = (4, 8)  # pixels the shape moves from one frame to the next (drawn per video)
    # Written as each row's `instruction` column (see `Task.instruction`): a short format instruction keeps the prompt
    # mostly image, which is what lets a tiny model learn to look (measured: steps twice as fast, see demo.py).
    instruction: str | None = "Think in <think> </think>, answer in <answer> </answer>."

    def __post_init__(self) -> None:
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}; known: {list(COLOURS)}, {list(SHAPES)}")
        if set(self.question_first) - set(FAMILIES):
            raise ValueError(f"question_first {self.question_first}: image families are {FAMILIES}")
        if self.chart_side % CELL:
            raise ValueError(f"chart_side ({self.chart_side}) must be a multiple of {CELL}")
        for jitter in (self.jitter, self.grounding_jitter):
            if not 4 <= max(self.shape_sizes.values()) <= CELL - 2 * jitter:
                raise ValueError(f"shapes of sizes {self.shape_sizes} with jitter {jitter} do not fit a "
                                 f"{CELL}-pixel cell")
        if not 2 <= self.bars <= len(self.colours):
            raise ValueError(f"bars must be 2..{len(self.colours)} (one colour each), got {self.bars}")
        if not 1 <= self.chart_answers[0] <= self.chart_answers[1] <= self.bar_max:
            raise ValueError(f"chart_answers {self.chart_answers} must lie in 1..bar_max ({self.bar_max})")
        if not 0 <= self.math_counts[0] <= self.math_counts[1] <= self.math_grid ** 2:
            raise ValueError(f"math_counts {self.math_counts} must lie in 0..{self.math_grid ** 2}")
        if self.grounding_shades and len(self.grounding_shades) != self.grid ** 2:
            raise ValueError(f"grounding_shades needs one shade per cell ({self.grid ** 2}), got "
                             f"{len(self.grounding_shades)}")
        lo_n, hi_n = self.grounding_objects
        if not 1 <= lo_n <= hi_n <= self.grid * self.grid:
            raise ValueError(f"grounding_objects {self.grounding_objects} must lie in 1..{self.grid * self.grid}")
        lo_s, hi_s = self.motion_step
        travel = hi_s * (self.motion_frames - 1)
        if self.motion_frames < 2 or not 1 <= lo_s <= hi_s or max(self.shape_sizes.values()) + travel > self.motion_side:
            raise ValueError(f"motion: {self.motion_frames} frames at up to {hi_s} pixels a frame do not fit a "
                             f"{self.motion_side}-pixel frame (need >= 2 frames, 1 <= step low <= step high)")

    @property
    def cell(self) -> int:
        return CELL

    def side(self, family: str) -> int:
        """The square image's side in pixels for `family`."""
        return {"math": self.math_grid * CELL, "chart": self.chart_side, "grounding": self.grid * CELL,
                "motion": self.motion_side}[family]

    @property
    def shape_sizes(self) -> dict[str, int]:
        """Box side per shape, chosen so that every shape covers about the same number of pixels: the amount of a
        colour in a picture is then proportional to the number of shapes of that colour, whatever their kinds."""
        s = self.shape_side
        return {"square": s, "circle": round(s * 2 / math.sqrt(math.pi)), "triangle": round(s * math.sqrt(2))}


@dataclass
class SyntheticItem:
    image: Image.Image
    question: str
    answer: Any  # str for math, chart and motion; [x1, y1, x2, y2] pixels (x2, y2 exclusive) for grounding
    meta: dict[str, Any] = field(default_factory=dict)
    key: tuple = ()
    frames: list[Image.Image] = field(default_factory=list)  # a video family's frames (then `image` is frame 0)


# ------------------------------------------------------------------------------------------------------------- math
def _random_shape(rng: random.Random, cfg: SyntheticConfig, col: int, row: int, colour: str, kind: str,
                  jitter: int) -> Shape:
    size = cfg.shape_sizes[kind]
    slack = min(jitter, (cfg.cell - size) // 2)
    return shape_in_cell(col, row, cfg.cell, colour, kind, size, rng.randint(-slack, slack), rng.randint(-slack, slack))


def make_math(rng: random.Random, cfg: SyntheticConfig) -> SyntheticItem:
    """Each cell is empty or holds one shape. Questions: how many shapes ("shapes"), how many different colours
    ("colours"), how many cells are empty ("empty"), how many shapes of one colour ("colour"), and the sum ("total") or
    difference ("more") of two colours' counts."""
    kind = rng.choice(cfg.math_questions)
    grid = cfg.math_grid
    cells = [(c, r) for r in range(grid) for c in range(grid)]
    c1, c2 = rng.sample(cfg.colours, 2)
    while True:
        if kind in ("shapes", "colours", "empty"):  # the number of shapes spreads evenly over math_counts
            filled = set(rng.sample(range(len(cells)), rng.randint(*cfg.math_counts)))
            content = [rng.choice(cfg.colours) if i in filled else None for i in range(len(cells))]
        else:  # the asked colours are favoured so that their counts spread out
            content = [rng.choice([None, c1, c2, rng.choice(cfg.colours)]) for _ in cells]
        n1, n2 = content.count(c1), content.count(c2)
        if kind != "more" or n1 >= n2:
            break
    shapes = [_random_shape(rng, cfg, c, r, colour, rng.choice(cfg.shapes), cfg.jitter)
              for (c, r), colour in zip(cells, content) if colour is not None]
    if kind == "shapes":
        question, answer = "How many shapes are there?", len(shapes)
    elif kind == "colours":
        question, answer = "How many different colours are there?", len({s.colour for s in shapes})
    elif kind == "empty":
        question, answer = f"The picture is a {grid} by {grid} grid. How many cells are empty?", \
            len(cells) - len(shapes)
    elif kind == "colour":
        question, answer = f"How many {c1} shapes are there?", n1
    elif kind == "total":
        question, answer = f"How many {c1} and {c2} shapes are there in total?", n1 + n2
    elif kind == "more":
        question, answer = f"How many more {c1} shapes than {c2} shapes are there?", n1 - n2
    else:
        raise ValueError(f"unknown math question kind {kind!r} (known: shapes, colours, empty, colour, total, more)")
    key = ("math", tuple((s.col, s.row, s.colour, s.kind) for s in shapes), question)
    side = cfg.side("math")
    return SyntheticItem(draw_shapes(side, side, shapes), question, str(answer),
                         {"question_kind": kind, "synthetic": "math"}, key)


# ------------------------------------------------------------------------------------------------------------ chart
CHART_TOP = 12  # pixels above the tallest possible bar, for its value label


def bar_geometry(cfg: SyntheticConfig, index: int, value: int) -> tuple[int, int, int, int]:
    """The bar's pixel box [x1, y1, x2, y2): bars share the width evenly, height proportional to the value."""
    side = cfg.chart_side
    slot = side // cfg.bars
    width = slot // 2
    x1 = index * slot + (slot - width) // 2
    unit = (side - CHART_TOP - 1) // cfg.bar_max
    return (x1, side - 1 - value * unit, x1 + width, side - 1)


def make_chart(rng: random.Random, cfg: SyntheticConfig) -> SyntheticItem:
    """A bar chart: distinct colours, values 1..bar_max written above each bar (a unique extreme when one is asked
    for by colour)."""
    kind = rng.choice(cfg.chart_questions)
    colours = rng.sample(cfg.colours, cfg.bars)
    while True:
        values = [rng.randint(1, cfg.bar_max) for _ in colours]
        if kind not in ("tallest", "shortest") or values.count(max(values) if kind == "tallest" else min(values)) == 1:
            break
    side = cfg.chart_side
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliasing: the label pixels are pure black
    font = ImageFont.load_default(size=10)
    draw.line((0, side - 1, side - 1, side - 1), fill=(0, 0, 0))  # the axis
    for i, (colour, value) in enumerate(zip(colours, values)):
        x1, y1, x2, y2 = bar_geometry(cfg, i, value)
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=COLOURS[colour])
        draw.text(((x1 + x2) / 2, y1 - 1), str(value), fill=(0, 0, 0), font=font, anchor="mb")
    a, b = rng.sample(range(cfg.bars), 2)
    if kind == "tallest":
        question, answer = "Which colour is the tallest bar?", colours[values.index(max(values))]
    elif kind == "shortest":
        question, answer = "Which colour is the shortest bar?", colours[values.index(min(values))]
    elif kind == "value":
        question, answer = f"What is the value of the {colours[a]} bar?", str(values[a])
    elif kind == "difference":
        question, answer = (f"What is the difference between the {colours[a]} bar and the {colours[b]} bar?",
                            str(abs(values[a] - values[b])))
    elif kind == "sum":
        question, answer = "What is the sum of all the bar values?", str(sum(values))
    elif kind == "max":
        question, answer = "What is the largest value in the chart?", str(max(values))
    else:
        raise ValueError(f"unknown chart question kind {kind!r} (known: tallest, shortest, value, difference, sum, max)")
    meta = {"question_kind": kind, "synthetic": "chart", "bar_colours": colours, "bar_values": values}
    return SyntheticItem(img, question, answer, meta, ("chart", tuple(colours), tuple(values), question))


# -------------------------------------------------------------------------------------------------------- grounding
def make_grounding(rng: random.Random, cfg: SyntheticConfig) -> SyntheticItem:
    """Objects in distinct cells; the phrase names one by colour and shape, and no other object matches it."""
    cells = rng.sample([(c, r) for r in range(cfg.grid) for c in range(cfg.grid)], rng.randint(*cfg.grounding_objects))
    target_colour, target_kind = rng.choice(cfg.colours), rng.choice(cfg.shapes)
    specs = [(target_colour, target_kind)]
    for _ in cells[1:]:
        while True:
            colour, kind = rng.choice(cfg.colours), rng.choice(cfg.shapes)
            if (colour, kind) != (target_colour, target_kind) and (cfg.grounding_same_colour or colour != target_colour):
                break
        specs.append((colour, kind))
    shapes = [_random_shape(rng, cfg, c, r, colour, kind, cfg.grounding_jitter)
              for (c, r), (colour, kind) in zip(cells, specs)]
    target = shapes[0]
    phrase = f"the {target_colour} {target_kind}"
    side = cfg.side("grounding")
    key = ("grounding", tuple(sorted((s.col, s.row, s.colour, s.kind) for s in shapes)), phrase)
    meta = {"phrase": phrase, "image_width": side, "image_height": side, "synthetic": "grounding"}
    image = draw_shapes(side, side, shapes, cell=cfg.cell, cell_shades=cfg.grounding_shades)
    return SyntheticItem(image, f"Find {phrase}.", list(target.box), meta, key)


GENERATORS = {"math": make_math, "chart": make_chart, "grounding": make_grounding}
# Video families: `generator(rng, cfg, slot)`, where `slot` is the index of the scene in its split (for balance).
VIDEO_GENERATORS = {"motion": make_motion}
VIDEO_FAMILIES = tuple(VIDEO_GENERATORS)
ALL_FAMILIES = FAMILIES + VIDEO_FAMILIES


def answer_classes(family: str, cfg: SyntheticConfig) -> list[str] | None:
    """The answers a split of `family` is balanced over (`answer_key` of an item), or None where the question kinds
    configured have no fixed answer set (then answers are left as drawn)."""
    if family == "math" and set(cfg.math_questions) == {"shapes"}:
        return [str(n) for n in range(cfg.math_counts[0], cfg.math_counts[1] + 1)]
    if family == "chart" and set(cfg.chart_questions) == {"max"}:
        return [str(v) for v in range(cfg.chart_answers[0], cfg.chart_answers[1] + 1)]
    if family == "grounding" and cfg.grounding_jitter == 0:  # one box per (cell, shape)
        return [answer_key(list(shape_in_cell(c, r, cfg.cell, "red", kind, cfg.shape_sizes[kind], 0, 0).box))
                for r in range(cfg.grid) for c in range(cfg.grid) for kind in cfg.shapes]
    return None


def gold_completion(family: str, answer: Any) -> str:
    """The shortest well-formed completion for a gold answer (what the cold start is taught to write)."""
    return f"<think></think><answer>{answer_key(answer)}</answer>"
