"""How analysis tables write a number with its spread, so an undefined spread never reads as zero."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

UNDEFINED = "–"


def sample_std(values: list[float]) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than two values, whose spread is undefined."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if len(finite) < 2:
        return float("nan")
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def defined_mean(values: Iterable[float]) -> float:
    """Mean of the values that are defined (not NaN); NaN when none is."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table, one line per row, ending in a newline."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_spread_text(mean: float, spread: float, *, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± spread``; ``mean ± –`` when the spread is undefined (one seed, one pair); ``n/a`` without a mean."""
    if mean is None or math.isnan(mean):
        return "n/a"
    spread_text = UNDEFINED if spread is None or math.isnan(spread) else f"{scale * spread:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {spread_text}"
