"""The synthetic video task: one shape moving in a straight line across a few frames; which way does it move?

Every frame is drawn like the image families' scenes (flat colours, no anti-aliasing, `shapes.draw_shapes`), and the
shape moves by the same number of pixels from each frame to the next, staying whole inside the frame. The direction
of the `slot`-th scene of a split is `DIRECTIONS[slot % 4]`, so every split's answers are balanced exactly (up to
its last incomplete round of four); colour, shape, speed and the start are drawn from the seeded stream.
"""

from __future__ import annotations

import random

from vlm_sapo.demo.synthetic.shapes import Shape, draw_shapes

DIRECTIONS = ("left", "right", "up", "down")
_UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def make_motion(rng: random.Random, cfg, slot: int):
    """A `SyntheticItem` whose `frames` are the video (`cfg.motion_frames` frames) and whose answer is its direction."""
    from vlm_sapo.demo.synthetic.tasks import SyntheticItem

    direction = DIRECTIONS[slot % len(DIRECTIONS)]
    colour, kind = rng.choice(cfg.colours), rng.choice(cfg.shapes)
    size, side = cfg.shape_sizes[kind], cfg.side("motion")
    step = rng.randint(*cfg.motion_step)
    travel = step * (cfg.motion_frames - 1)
    ux, uy = _UNIT[direction]
    # the start leaves room for the whole path: a shape moving right starts at most side - size - travel
    x0 = rng.randint(travel if ux < 0 else 0, side - size - (travel if ux > 0 else 0))
    y0 = rng.randint(travel if uy < 0 else 0, side - size - (travel if uy > 0 else 0))
    frames = []
    for t in range(cfg.motion_frames):
        x, y = x0 + ux * step * t, y0 + uy * step * t
        frames.append(draw_shapes(side, side, [Shape(0, 0, colour, kind, (x, y, x + size, y + size))]))
    question = f"Which way does the {colour} {kind} move: left, right, up or down?"
    meta = {"synthetic": "motion", "start": [x0, y0], "step": step, "num_frames": cfg.motion_frames}
    key = ("motion", direction, colour, kind, x0, y0, step)
    return SyntheticItem(frames[0], question, direction, meta, key, frames=frames)
