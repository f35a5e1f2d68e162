"""Results tables: test AUC / AUPRC mean +- std over seeds per model x init x data size."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.records import JobRecord


@dataclass(frozen=True)
class ResultRow:
    model: str
    init: str
    data_size: str
    seeds: int
    auc_mean: float
    auc_std: float
    auprc_mean: float
    auprc_std: float
    train_seconds: float

    def auc_text(self) -> str:
        return _pm(self.auc_mean, self.auc_std)

    def auprc_text(self) -> str:
        return _pm(self.auprc_mean, self.auprc_std)


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    # Sample std over seeds (ddof=1) as the paper's tables; one seed has no spread.
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def results_table(records: list[JobRecord]) -> list[ResultRow]:
    """One row per (model, init, data size) over the FINISHED records, in first-seen order."""
    cells: dict[tuple[str, str, str], list[JobRecord]] = defaultdict(list)
    for record in records:
        if record.status == "FINISHED":
            cells[record.cell].append(record)
    rows = []
    for (model, init, size), members in cells.items():
        auc = _mean_std([r.metrics.get("test/auc", float("nan")) for r in members])
        auprc = _mean_std([r.metrics.get("test/auprc", float("nan")) for r in members])
        seconds = float(np.mean([r.metrics.get("time/train_s", float("nan")) for r in members]))
        rows.append(ResultRow(model, init, size, len(members), *auc, *auprc, seconds))
    return rows


def write_csv(rows: list[ResultRow], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "init", "data_size", "seeds", "test_auc_mean", "test_auc_std",
                         "test_auprc_mean", "test_auprc_std", "train_seconds_mean"])  # fmt: skip
        for r in rows:
            writer.writerow([r.model, r.init, r.data_size, r.seeds, f"{r.auc_mean:.6f}", f"{r.auc_std:.6f}",
                             f"{r.auprc_mean:.6f}", f"{r.auprc_std:.6f}", f"{r.train_seconds:.2f}"])  # fmt: skip
    return path


def to_markdown(rows: list[ResultRow], *, title: str | None = None) -> str:
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| model | init | data size | seeds | test AUC % | test AUPRC % | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.init} | {r.data_size} | {r.seeds} | {r.auc_text()} | {r.auprc_text()} | {r.train_seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(rows: list[ResultRow], path: Path, *, title: str = "Test AUC by model and init") -> Path:
    """Grouped bars: one group per model (and data size), one bar per init, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.model, r.data_size) for r in rows))
    inits = list(dict.fromkeys(r.init for r in rows))
    by_key = {(r.model, r.data_size, r.init): r for r in rows}
    width = 0.8 / max(1, len(inits))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 3.8))
    for i, init in enumerate(inits):
        xs, means, stds = [], [], []
        for g, (model, size) in enumerate(groups):
            row = by_key.get((model, size, init))
            if row is None:
                continue
            xs.append(g + (i - (len(inits) - 1) / 2) * width)
            means.append(100 * row.auc_mean)
            stds.append(100 * row.auc_std)
        ax.bar(xs, means, width=width, yerr=stds, capsize=3, label=init)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{s}" for m, s in groups])
    ax.set_ylabel("test AUC (%)")
    finite = [100 * r.auc_mean for r in rows if not math.isnan(r.auc_mean)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 10), 100)
    ax.set_title(title)
    ax.legend(title="init", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
