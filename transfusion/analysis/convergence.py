"""Figure 5: convergence — validation AUC against steps, and steps to a threshold AUC.

The threshold is absolute (default: the paper's 0.91 validation AUC) or relative to
the best final validation AUC of the (model, data size) cell (e.g. 0.95 x best). Grids
whose step counts are compared (Figure 5's ``convergence`` and ``convergence-slim``)
must use one absolute threshold: a relative one differs per cell. A run that never
reaches it counts as not converged and is reported as such, never as the last step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.formatting import mean_spread_text, sample_std
from transfusion.analysis.plotting import pyplot, save_figure
from transfusion.analysis.records import JobRecord

PAPER_THRESHOLD = 0.91


@dataclass(frozen=True)
class ConvergenceSettings:
    threshold: float = PAPER_THRESHOLD
    relative: bool = False  # True: threshold x best final val AUC of the (model, data size) cell

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"convergence threshold must be in (0, 1], got {self.threshold}")

    @property
    def mode(self) -> str:
        return "relative" if self.relative else "absolute"

    def describe(self) -> str:
        """The threshold in words, as the report states it."""
        if self.relative:
            return f"{self.threshold:.3f} x the best final validation AUC of each (model, data size) (relative)"
        paper = " (the paper's 91 %)" if self.threshold == PAPER_THRESHOLD else ""
        return f"validation AUC {self.threshold:.3f} (absolute){paper}"


@dataclass(frozen=True)
class ConvergenceRow:
    model: str
    data_size: str
    init: str
    threshold: float
    steps_mean: float
    steps_std: float
    reached: int
    runs: int


def steps_to_auc(curve: tuple[tuple[int, float], ...] | list[tuple[int, float]], threshold: float) -> int | None:
    """First step whose validation AUC reaches ``threshold`` (None if never)."""
    for step, value in sorted(curve):
        if value >= threshold:
            return int(step)
    return None


def convergence_table(records: list[JobRecord], settings: ConvergenceSettings | None = None) -> list[ConvergenceRow]:
    settings = settings or ConvergenceSettings()
    cells: dict[tuple[str, str], list[JobRecord]] = defaultdict(list)
    for r in records:
        if r.status == "FINISHED" and r.val_curve:
            cells[(r.model, r.data_size)].append(r)
    rows = []
    for (model, size), members in cells.items():
        best_final = max(sorted(r.val_curve)[-1][1] for r in members)
        threshold = settings.threshold * best_final if settings.relative else settings.threshold
        by_init: dict[str, list[JobRecord]] = defaultdict(list)
        for r in members:
            by_init[r.init].append(r)
        for init, runs in by_init.items():
            steps = [steps_to_auc(r.val_curve, threshold) for r in runs]
            reached = [s for s in steps if s is not None]
            mean = float(np.mean(reached)) if reached else math.nan
            std = sample_std(reached)  # NaN (printed "–") when fewer than two runs reached it
            rows.append(ConvergenceRow(model, size, init, threshold, mean, std, len(reached), len(runs)))
    return rows


def convergence_markdown(rows: list[ConvergenceRow]) -> str:
    lines = [
        "| model | data size | init | threshold AUC | steps to threshold | runs reaching it |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.reached == 0:
            steps = f"never reached {r.threshold:.3f}"
        else:
            steps = mean_spread_text(r.steps_mean, r.steps_std, digits=0)
            if r.reached < r.runs:
                steps += f" ({r.runs - r.reached} of {r.runs} runs never reached it; mean of the others)"
        lines.append(f"| {r.model} | {r.data_size} | {r.init} | {r.threshold:.3f} | {steps} | {r.reached}/{r.runs} |")
    return "\n".join(lines) + "\n"


def plot_convergence(records: list[JobRecord], path: Path, *, rows: list[ConvergenceRow] | None = None) -> Path:
    """One panel per (model, data size): mean validation AUC per init over steps, std shaded."""
    plt = pyplot()

    cells: dict[tuple[str, str], dict[str, list[JobRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.status == "FINISHED" and r.val_curve:
            cells[(r.model, r.data_size)][r.init].append(r)
    keys = list(cells)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.4 * max(1, len(keys)), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        for init, runs in cells[key].items():
            steps = sorted({s for r in runs for s, _ in r.val_curve})
            values = np.array([[dict(r.val_curve).get(s, np.nan) for s in steps] for r in runs], dtype=float)
            mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            ax.plot(steps, mean, marker=".", label=init)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        for row in rows or []:
            if (row.model, row.data_size) == key:
                ax.axhline(row.threshold, color="grey", linestyle=":", linewidth=1)
                break
        ax.set_title(f"{key[0]} ({key[1]})")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("validation AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 5: convergence by initialisation")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
