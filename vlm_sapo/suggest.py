"""The "did you mean" hint every registry lookup and the recipe checker append to an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable


def did_you_mean(name: str, choices: Iterable[str], quote: Callable[[str], str] = repr) -> str:
    """`"; did you mean 'closest'?"`, or `""` when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {quote(close[0])}?" if close else ""
