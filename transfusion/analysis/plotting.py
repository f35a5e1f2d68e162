"""Saving figures so a reader (or a test) can tell what is in them without looking."""

from __future__ import annotations

import json
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int = 110) -> Path:
    """Saves ``fig`` as PNG with its panel titles in the PNG's ``Description`` text chunk."""
    panels = [ax.get_title() for ax in fig.axes if ax.get_title()]
    title = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Title": title, "Description": json.dumps(panels)})
    pyplot().close(fig)
    return path


def panel_titles(path: Path) -> list[str]:
    """The panel titles :func:`save_figure` stored in a PNG."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text.get("Description", "[]"))
