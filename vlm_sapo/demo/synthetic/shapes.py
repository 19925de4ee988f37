"""Flat-colour shapes in the cells of a grid, drawn with PIL.

A Qwen2/2.5-VL image token covers 28 x 28 pixels (14-pixel patches merged 2 x 2); a cell of 56 pixels is 2 x 2 image
tokens. Colours are pure and well apart and shapes are drawn without anti-aliasing, so tests can recover every answer
from the pixels alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 90, 220),
    "green": (30, 160, 60),
    "yellow": (230, 190, 20),
}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Shape:
    """One object: its cell (column, row), colour, kind and exact pixel box [x1, y1, x2, y2) (x2, y2 exclusive)."""

    col: int
    row: int
    colour: str
    kind: str
    box: tuple[int, int, int, int]


def shape_in_cell(col: int, row: int, cell: int, colour: str, kind: str, size: int, dx: int, dy: int) -> Shape:
    """A `size`-pixel object in cell (col, row) of a grid of `cell`-pixel cells, shifted by (dx, dy) from its centre."""
    x1 = col * cell + (cell - size) // 2 + dx
    y1 = row * cell + (cell - size) // 2 + dy
    if not (col * cell <= x1 and x1 + size <= (col + 1) * cell and row * cell <= y1 and y1 + size <= (row + 1) * cell):
        raise ValueError(f"a {size}-pixel shape shifted by ({dx}, {dy}) leaves its cell")
    return Shape(col, row, colour, kind, (x1, y1, x1 + size, y1 + size))


def draw_shapes(width: int, height: int, shapes: list[Shape], *, cell: int = 0,
                cell_shades: tuple[tuple[int, int, int], ...] = ()) -> Image.Image:
    """Shapes on white; with `cell_shades`, grid cell k (row-major, `cell` pixels) is first filled with shade k."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    cols = width // cell if cell else 0
    for k, shade in enumerate(cell_shades):
        x, y = (k % cols) * cell, (k // cols) * cell
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=shade)
    for s in shapes:
        x1, y1, x2, y2 = s.box
        fill = COLOURS[s.colour]
        if s.kind == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif s.kind == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s.kind!r} (known: {', '.join(SHAPES)})")
    return img
