"""Synthetic task families with exact answers, one generator each: counting arithmetic (math), bar charts (chart),
finding a described shape (grounding), and one video family: which way a shape moves (motion, `synthetic.motion`).

Each generator draws one scene from a `random.Random` and returns a `SyntheticItem`; its `key` names the scene up to
pixel jitter, so that train, validation and test splits can be kept disjoint by content, not just by row. Difficulty is
set by `SyntheticConfig`; its defaults were measured to suit the CPU demo's tiny model (see `vlm_sapo/demo.py`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vlm_sapo.synthetic.motion import make_motion
from vlm_sapo.synthetic.shapes import BACKGROUND, COLOURS, SHAPES, Shape, draw_shapes, shape_in_cell

FAMILIES = ("math", "chart", "grounding")


@dataclass(frozen=True)
class SyntheticConfig:
    image_size: int = 56  # square images; Qwen2.5-VL turns each 28 x 28 pixels into one image token
    grid: int = 2  # cells per side; one object at most per cell
    colours: tuple[str, ...] = ("red", "blue", "green", "yellow")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    shape_side: int = 16  # a square's side; circles and triangles are sized to the same area (see `shape_sizes`)
    jitter: int = 2  # largest shift of an object from its cell's centre, pixels
    math_questions: tuple[str, ...] = ("shapes",)
    bars: int = 3  # bars per chart
    bar_max: int = 4  # bar values are 1..bar_max
    chart_questions: tuple[str, ...] = ("max",)
    grounding_objects: tuple[int, int] = (2, 2)  # objects per grounding scene, the target included
    grounding_same_colour: bool = False  # distractors may share the target's colour (then its shape tells it apart)
    motion_frames: int = 4  # frames per motion video
    motion_step: tuple[int, int] = (4, 8)  # pixels the shape moves from one frame to the next (drawn per video)
    # Written as each row's `instruction` column (see `Task.instruction`): a short format instruction keeps the prompt
    # mostly image, which is what lets a tiny model learn to look (measured: steps twice as fast, see demo.py).
    instruction: str | None = "Think in <think> </think>, answer in <answer> </answer>."

    def __post_init__(self) -> None:
        if self.grid < 1 or self.image_size % self.grid or self.image_size % 28:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of 28 and of grid ({self.grid})")
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}; known: {list(COLOURS)}, {list(SHAPES)}")
        if not 4 <= max(self.shape_sizes.values()) <= self.cell - 2 * self.jitter:
            raise ValueError(f"shapes of sizes {self.shape_sizes} with jitter {self.jitter} do not fit a "
                             f"{self.cell}-pixel cell")
        if not 2 <= self.bars <= len(self.colours):
            raise ValueError(f"bars must be 2..{len(self.colours)} (one colour each), got {self.bars}")
        lo_n, hi_n = self.grounding_objects
        if not 1 <= lo_n <= hi_n <= self.grid * self.grid:
            raise ValueError(f"grounding_objects {self.grounding_objects} must lie in 1..{self.grid * self.grid}")
        lo_s, hi_s = self.motion_step
        travel = hi_s * (self.motion_frames - 1)
        if self.motion_frames < 2 or not 1 <= lo_s <= hi_s or max(self.shape_sizes.values()) + travel > self.image_size:
            raise ValueError(f"motion: {self.motion_frames} frames at up to {hi_s} pixels a frame do not fit a "
                             f"{self.image_size}-pixel frame (need >= 2 frames, 1 <= step low <= step high)")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid

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
def _random_shape(rng: random.Random, cfg: SyntheticConfig, col: int, row: int, colour: str, kind: str) -> Shape:
    size = cfg.shape_sizes[kind]
    slack = min(cfg.jitter, (cfg.cell - size) // 2)
    return shape_in_cell(col, row, cfg.cell, colour, kind, size, rng.randint(-slack, slack), rng.randint(-slack, slack))


def make_math(rng: random.Random, cfg: SyntheticConfig) -> SyntheticItem:
    """Each cell is empty or holds one shape. Questions: how many shapes ("shapes"), how many different colours
    ("colours"), how many cells are empty ("empty"), how many shapes of one colour ("colour"), and the sum ("total") or
    difference ("more") of two colours' counts."""
    kind = rng.choice(cfg.math_questions)
    cells = [(c, r) for r in range(cfg.grid) for c in range(cfg.grid)]
    c1, c2 = rng.sample(cfg.colours, 2)
    while True:
        if kind in ("shapes", "colours", "empty"):  # the number of shapes spreads evenly over 0..cells
            filled = set(rng.sample(range(len(cells)), rng.randint(0, len(cells))))
            content = [rng.choice(cfg.colours) if i in filled else None for i in range(len(cells))]
        else:  # the asked colours are favoured so that their counts spread out
            content = [rng.choice([None, c1, c2, rng.choice(cfg.colours)]) for _ in cells]
        n1, n2 = content.count(c1), content.count(c2)
        if kind != "more" or n1 >= n2:
            break
    shapes = [_random_shape(rng, cfg, c, r, colour, rng.choice(cfg.shapes))
              for (c, r), colour in zip(cells, content) if colour is not None]
    if kind == "shapes":
        question, answer = "How many shapes are there?", len(shapes)
    elif kind == "colours":
        question, answer = "How many different colours are there?", len({s.colour for s in shapes})
    elif kind == "empty":
        question, answer = f"The picture is a {cfg.grid} by {cfg.grid} grid. How many cells are empty?", \
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
    side = cfg.image_size
    return SyntheticItem(draw_shapes(side, side, shapes), question, str(answer),
                         {"question_kind": kind, "synthetic": "math"}, key)


# ------------------------------------------------------------------------------------------------------------ chart
CHART_TOP = 12  # pixels above the tallest possible bar, for its value label


def bar_geometry(cfg: SyntheticConfig, index: int, value: int) -> tuple[int, int, int, int]:
    """The bar's pixel box [x1, y1, x2, y2): bars share the width evenly, height proportional to the value."""
    side = cfg.image_size
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
    side = cfg.image_size
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
    shapes = [_random_shape(rng, cfg, c, r, colour, kind) for (c, r), (colour, kind) in zip(cells, specs)]
    target = shapes[0]
    phrase = f"the {target_colour} {target_kind}"
    side = cfg.image_size
    key = ("grounding", tuple(sorted((s.col, s.row, s.colour, s.kind) for s in shapes)), phrase)
    meta = {"phrase": phrase, "image_width": side, "image_height": side, "synthetic": "grounding"}
    return SyntheticItem(draw_shapes(side, side, shapes), f"Find {phrase}.", list(target.box), meta, key)


GENERATORS = {"math": make_math, "chart": make_chart, "grounding": make_grounding}
# Video families: `generator(rng, cfg, slot)`, where `slot` is the index of the scene in its split (for balance).
VIDEO_GENERATORS = {"motion": make_motion}
VIDEO_FAMILIES = tuple(VIDEO_GENERATORS)
ALL_FAMILIES = FAMILIES + VIDEO_FAMILIES


def gold_completion(family: str, answer: Any) -> str:
    """The shortest well-formed completion for a gold answer (what the cold start is taught to write)."""
    text = "[" + ", ".join(str(int(v)) for v in answer) + "]" if family == "grounding" else str(answer)
    return f"<think></think><answer>{text}</answer>"
