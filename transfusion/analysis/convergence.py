"""Figure 5: convergence — validation AUC against steps, and steps to a threshold AUC.

The threshold is absolute (default: the paper's 0.91 validation AUC) or relative to
the best final validation AUC of the (model, data size) cell (e.g. 0.95 x best). Grids
whose step counts are compared (Figure 5's ``convergence`` and ``convergence-slim``)
must use one absolute threshold: a relative one differs per cell.

Steps to the threshold are censored data, reported as such:

- a run's step is interpolated linearly between the two evaluations around the crossing
  (the first evaluation at or above the threshold and the one before it), so it does
  not jump by ``eval_every``;
- a run that never reaches it is *censored* at its last evaluated step ("> last step"),
  never left out: a mean over the runs that did reach it makes an init with failures
  look faster;
- a cell reports the *median* over its seeds, a censored run counting as slower than
  every run that reached it (the runs of a grid share one step count); when the median
  falls on a censored run it is itself censored and printed "> N" -- with the number of
  runs that reached it ("2/3 reached") and every seed's value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
class RunConvergence:
    """One run's steps to the threshold.

    Attributes:
        seed: The run's seed.
        steps: The interpolated crossing step; for a run that never reached the threshold,
            its last evaluated step (the censoring point: the true value is above it).
        reached: Whether the run reached the threshold.
    """

    seed: int
    steps: float
    reached: bool

    def text(self) -> str:
        return _steps_text(self.steps, censored=not self.reached)


@dataclass(frozen=True)
class ConvergenceRow:
    """Steps to the threshold of one (model, data size, init) over its seeds.

    Attributes:
        steps_median: Median over the runs, censored runs counting as slower than every
            run that reached the threshold; when ``median_censored``, a lower bound.
        median_censored: The median falls on a run that never reached the threshold: the
            cell's median is only known to exceed ``steps_median`` (printed "> N").
        reached: Runs that reached the threshold, of ``runs``.
        per_run: Every run's value, by seed.
    """

    model: str
    data_size: str
    init: str
    threshold: float
    steps_median: float
    median_censored: bool
    reached: int
    runs: int
    per_run: tuple[RunConvergence, ...] = ()

    @property
    def steps_text(self) -> str:
        """The median as printed: ``190``, or ``> 400`` when censored."""
        return _steps_text(self.steps_median, censored=self.median_censored)

    @property
    def steps_mean(self) -> float:
        """Mean over *all* runs when every run reached the threshold, else NaN (never a mean over survivors)."""
        if not self.per_run or self.reached < self.runs:
            return math.nan
        return float(np.mean([r.steps for r in self.per_run]))

    @property
    def steps_std(self) -> float:
        """Sample std over all runs when every run reached the threshold, else NaN."""
        if not self.per_run or self.reached < self.runs or self.runs < 2:
            return math.nan
        return float(np.std([r.steps for r in self.per_run], ddof=1))


def _steps_text(steps: float, *, censored: bool) -> str:
    value = f"{steps:.0f}"
    return f"> {value}" if censored else value


def steps_to_auc(curve: tuple[tuple[int, float], ...] | list[tuple[int, float]], threshold: float) -> float | None:
    """Step at which validation AUC reaches ``threshold``; None if it never does.

    Linear interpolation between the first evaluation at or above the threshold and the
    evaluation before it (below it, by definition); an AUC already at the threshold at
    the first evaluation gives that evaluation's step.
    """
    previous: tuple[int, float] | None = None
    for step, value in sorted(curve):
        if value >= threshold:
            if previous is None:
                return float(step)
            (s0, v0), s1 = previous, float(step)
            return s0 + (threshold - v0) / (value - v0) * (s1 - s0)
        previous = (step, value)
    return None


def run_convergence(record: JobRecord, threshold: float) -> RunConvergence:
    """A run's interpolated crossing, or its last evaluated step censored."""
    steps = steps_to_auc(record.val_curve, threshold)
    if steps is None:
        return RunConvergence(record.seed, float(max(s for s, _ in record.val_curve)), reached=False)
    return RunConvergence(record.seed, steps, reached=True)


def censored_median(runs: list[RunConvergence]) -> tuple[float, bool]:
    """(median, censored) over runs; a censored run ranks above every run that reached the threshold.

    Odd counts: the middle run, censored if it is. Even counts: the mean of the two middle
    runs, censored (a lower bound: the mean of their values) if either is.
    """
    if not runs:
        raise ValueError("censored_median needs at least one run")
    ranked = sorted(runs, key=lambda r: (not r.reached, r.steps))
    n = len(ranked)
    middle = ranked[(n - 1) // 2 : n // 2 + 1]
    return float(np.mean([r.steps for r in middle])), any(not r.reached for r in middle)


def convergence_table(records: list[JobRecord], settings: ConvergenceSettings | None = None) -> list[ConvergenceRow]:
    """Per (model, data size, init): the censored median of steps to the threshold over seeds."""
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
            per_run = tuple(sorted((run_convergence(r, threshold) for r in runs), key=lambda c: c.seed))
            median, censored = censored_median(list(per_run))
            reached = sum(c.reached for c in per_run)
            rows.append(ConvergenceRow(model, size, init, threshold, median, censored, reached, len(per_run), per_run))
    return rows


def convergence_markdown(rows: list[ConvergenceRow]) -> str:
    lines = [
        "| model | data size | init | threshold AUC | steps to threshold (median) | reached | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"s{c.seed}: {c.text()}" for c in r.per_run)
        lines.append(f"| {r.model} | {r.data_size} | {r.init} | {r.threshold:.3f} | {r.steps_text} "
                     f"| {r.reached}/{r.runs} reached | {seeds} |")  # fmt: skip
    note = (
        "Steps: interpolated between the evaluations around the crossing; the median over seeds, a run that "
        'never reached the threshold counting as "> its last step" (slower than every run that did); '
        '"> N": the median itself is such a run, only a lower bound.'
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def _convergence_figure(records: list[JobRecord], rows: list[ConvergenceRow]):
    plt = pyplot()
    cells: dict[tuple[str, str], dict[str, list[JobRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.status == "FINISHED" and r.val_curve:
            cells[(r.model, r.data_size)][r.init].append(r)
    keys = list(cells)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.4 * max(1, len(keys)), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        row_of = {row.init: row for row in rows if (row.model, row.data_size) == key}
        for colour, (init, runs) in enumerate(cells[key].items()):
            c = f"C{colour}"
            steps = sorted({s for r in runs for s, _ in r.val_curve})
            values = np.array([[dict(r.val_curve).get(s, np.nan) for s in steps] for r in runs], dtype=float)
            mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            ax.plot(steps, mean, marker=".", color=c, label=init)
            ax.fill_between(steps, mean - std, mean + std, color=c, alpha=0.2)
            row = row_of.get(init)
            if row is None:
                continue
            span = max(steps) - min(steps) or 1.0
            for run in row.per_run:
                if run.reached:  # each seed's interpolated crossing, on the threshold line
                    ax.plot(run.steps, row.threshold, marker="o", color=c, markersize=5, zorder=4)
                else:  # censored: at its last step, the arrow says "later than this"
                    ax.plot(run.steps, row.threshold, marker="o", markerfacecolor="none", color=c, zorder=4)
                    ax.annotate("→", xy=(run.steps + 0.02 * span, row.threshold), color=c, fontsize=11,
                                va="center", ha="left", annotation_clip=False)  # fmt: skip
                    ax.set_xlim(right=max(ax.get_xlim()[1], run.steps + 0.1 * span))  # room for the arrow
        if row_of:
            ax.axhline(next(iter(row_of.values())).threshold, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{key[0]} ({key[1]})")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("validation AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    caption = "(dots: each seed's crossing; ○→: never reached, at its last step)"
    fig.suptitle(f"Figure 5: convergence by initialisation\n{caption}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_convergence(records: list[JobRecord], path: Path, *, rows: list[ConvergenceRow] | None = None) -> Path:
    """One panel per (model, data size): mean validation AUC per init over steps (std shaded) and, on
    the threshold line, each seed's interpolated crossing; a run that never reached it is a hollow
    marker at its last step with an arrow (→)."""
    rows = convergence_table(records) if rows is None else rows
    return save_figure(_convergence_figure(records, rows), path, dpi=110)
