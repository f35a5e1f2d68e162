"""First-layer filters as images: random vs pretrained init, before and after training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transfusion.analysis.plotting import pyplot, save_figure
from transfusion.analysis.records import JobRecord
from transfusion.analysis.representations import is_step_file


def filter_paths(record: JobRecord) -> tuple[Path, Path] | None:
    """(at init, after training) conv1 weight files of a run, if stored."""
    if record.probe_dir is None:
        return None
    directory = record.probe_dir.parent / "filters"
    files = sorted((int(p.stem.split("-")[1]), p) for p in directory.glob("step-*.npy") if is_step_file(p))
    if len(files) < 2:
        return None
    return files[0][1], files[-1][1]


def filter_mosaic(weights: np.ndarray, *, count: int = 32, columns: int = 8) -> np.ndarray:
    """(out, in, k, k) conv weights -> an RGB mosaic, each filter scaled to [0, 1]."""
    weights = weights[:count]
    out, channels, k, _ = weights.shape
    if channels == 1:
        weights = np.repeat(weights, 3, axis=1)
    elif channels != 3:
        weights = weights[:, :3]
    rows = int(np.ceil(out / columns))
    pad = 1
    mosaic = np.ones((rows * (k + pad) + pad, columns * (k + pad) + pad, 3))
    for i, w in enumerate(weights):
        w = w.transpose(1, 2, 0)
        span = np.abs(w).max() or 1.0
        tile = 0.5 + 0.5 * w / span  # zero maps to grey, the sign shows as colour
        r, c = divmod(i, columns)
        mosaic[pad + r * (k + pad) : pad + r * (k + pad) + k, pad + c * (k + pad) : pad + c * (k + pad) + k] = tile
    return mosaic


def plot_filters(records: list[JobRecord], path: Path) -> Path | None:
    """For each model: one random-init and one pretrained run, conv1 before/after training."""
    plt = pyplot()

    chosen: list[tuple[str, JobRecord]] = []
    for model in dict.fromkeys(r.model for r in records):
        for init in dict.fromkeys(r.init for r in records if r.model == model):
            run = next((r for r in records if r.model == model and r.init == init and filter_paths(r)), None)
            if run is not None:
                chosen.append((f"{model} {init}", run))
    if not chosen:
        return None
    fig, axes = plt.subplots(len(chosen), 2, figsize=(6.4, 1.9 * len(chosen)), squeeze=False)
    for row, (label, run) in enumerate(chosen):
        before, after = filter_paths(run)
        for col, (title, file) in enumerate((("at init", before), ("after training", after))):
            ax = axes[row][col]
            ax.imshow(filter_mosaic(np.load(file)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}: {title}", fontsize=8)
    fig.suptitle("First-layer filters")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
