"""Results tables: test AUC / AUPRC mean ± std over seeds per model x init x data size.

Beside ours go the paper's numbers where they apply: Tables 1 and 3 were measured on
the paper's private retina set (labelled so), Table 2 on CheXpert, the same public
data set as ours but with a split the paper does not publish.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.formatting import UNDEFINED, markdown_table, mean_spread_text, sample_std
from transfusion.analysis.plotting import pyplot, save_figure
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
    params: float = float("nan")
    train_flops: float = float("nan")
    gpu_seconds: float = float("nan")
    source: str = ""
    source_weak: bool = False

    def auc_text(self) -> str:
        return _pm(self.auc_mean, self.auc_std)

    def auprc_text(self) -> str:
        return _pm(self.auprc_mean, self.auprc_std)


def _pm(mean: float, std: float) -> str:
    return mean_spread_text(mean, std, scale=100, digits=1)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    # Sample std over seeds (ddof=1) as the paper's tables; one seed has no spread (NaN, printed "–").
    return float(np.mean(values)), sample_std(values)


def finished_by_cell(records: list[JobRecord]) -> dict[tuple[str, str, str], list[JobRecord]]:
    """FINISHED records grouped by (model, init, data size), in first-seen order."""
    cells: dict[tuple[str, str, str], list[JobRecord]] = defaultdict(list)
    for record in records:
        if record.status == "FINISHED":
            cells[record.cell].append(record)
    return cells


def results_table(records: list[JobRecord]) -> list[ResultRow]:
    """One row per (model, init, data size) over the FINISHED records, in first-seen order."""
    cells = finished_by_cell(records)
    rows = []
    for (model, init, size), members in cells.items():
        auc = _mean_std([r.metrics.get("test/auc", float("nan")) for r in members])
        auprc = _mean_std([r.metrics.get("test/auprc", float("nan")) for r in members])

        def mean_of(key: str, members: list[JobRecord] = members) -> float:
            return float(np.mean([r.metrics.get(key, float("nan")) for r in members]))

        rows.append(
            ResultRow(
                model, init, size, len(members), *auc, *auprc,
                train_seconds=mean_of("time/train_s"),
                params=mean_of("cost/params"),
                train_flops=mean_of("cost/train_flops"),
                gpu_seconds=mean_of("time/gpu_s"),
                source=members[0].source,
                source_weak=any(r.source_weak for r in members),
            )
        )  # fmt: skip
    return rows


# Retina AUC % from PAPER.md (random -> ImageNet): Table 1 on full data, Table 3 on 5 000.
PAPER_RETINA = {
    "full": {
        "resnet50": (96.4, 96.7), "inception-v3": (96.6, 96.7), "cbr-large-tall": (96.2, 96.2),
        "cbr-large-wide": (95.8, 95.8), "cbr-small": (95.7, 95.8), "cbr-tiny": (95.8, 95.8),
    },
    "5000": {"resnet50": (92.2, 94.6), "cbr-large-tall": (93.6, 93.9), "cbr-large-wide": (93.6, 93.7)},
}  # fmt: skip


PAPER_RETINA_COLUMN = "paper (private retina set)"

# CheXpert AUC % per pathology from PAPER.md (Table 2, ResNet-50, full data).
CHEXPERT_PATHOLOGIES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
PAPER_CHEXPERT = {
    ("resnet50", "random"): (79.52, 75.23, 85.49, 88.34, 88.70),
    ("resnet50", "imagenet"): (79.76, 74.93, 84.42, 88.89, 88.07),
}
CHEXPERT_SPLIT_NOTE = (
    "Paper: Raghu et al. 2019 Table 2 (ResNet-50), on CheXpert, the same public data set as ours but on the "
    "paper's own train/test split, which is not published: compare levels with care."
)


def paper_auc(model: str, init: str, data_size: str) -> float | None:
    """The paper's retina AUC % for this cell, if it reports one."""
    column = {"random": 0, "imagenet": 1}.get(init)
    cell = PAPER_RETINA.get(str(data_size), {}).get(model)
    if column is None or cell is None:
        return None
    return cell[column]


def is_paper_retina(dataset: str) -> bool:
    return dataset.startswith("retina")


def is_chexpert(dataset: str) -> bool:
    return dataset == "chexpert"


def paper_delta_auc(dataset: str):
    """``(model, init, data size) -> paper's ImageNet - random AUC points`` for this dataset, or None."""

    def retina(model: str, init: str, data_size: str) -> float | None:
        if init != "imagenet":
            return None
        random, imagenet = paper_auc(model, "random", data_size), paper_auc(model, "imagenet", data_size)
        return None if random is None or imagenet is None else imagenet - random

    def chexpert(model: str, init: str, data_size: str) -> float | None:
        if init != "imagenet" or data_size != "full" or (model, "random") not in PAPER_CHEXPERT:
            return None
        return float(np.mean(PAPER_CHEXPERT[(model, "imagenet")]) - np.mean(PAPER_CHEXPERT[(model, "random")]))

    if is_paper_retina(dataset):
        return retina
    if is_chexpert(dataset):
        return chexpert
    return None


@dataclass(frozen=True)
class PathologyRow:
    """Per-pathology test metrics of one (model, init, data size): pathology -> (mean, std) over seeds."""

    model: str
    init: str
    data_size: str
    seeds: int
    auc: dict[str, tuple[float, float]]
    auprc: dict[str, tuple[float, float]]


def pathology_table(
    records: list[JobRecord], pathologies: tuple[str, ...] = CHEXPERT_PATHOLOGIES
) -> list[PathologyRow]:
    """Table 2 layout: test AUC and AUPRC per pathology, mean ± std over the FINISHED seeds of each cell."""
    cells = finished_by_cell(records)
    rows = []
    for (model, init, size), members in cells.items():

        def per_label(metric: str, members: list[JobRecord] = members) -> dict[str, tuple[float, float]]:
            return {p: _mean_std([r.metrics.get(f"test/{metric}/{p}", math.nan) for r in members]) for p in pathologies}

        rows.append(PathologyRow(model, init, size, len(members), per_label("auc"), per_label("auprc")))
    return rows


def pathology_markdown(
    rows: list[PathologyRow], *, with_paper: bool, pathologies: tuple[str, ...] = CHEXPERT_PATHOLOGIES
) -> str:
    """Per-pathology AUC % (with the paper's Table 2 rows under ours when ``with_paper``) and AUPRC %."""
    head = "| model | init | data size | seeds | " + " | ".join(pathologies) + " |"
    rule = "|" + "---|" * (4 + len(pathologies))
    lines = ["Test AUC % per pathology, mean ± std over seeds:", "", head, rule]
    for r in rows:
        lines.append(f"| {r.model} | {r.init} | {r.data_size} | {r.seeds} | "
                     + " | ".join(_pm(*r.auc[p]) for p in pathologies) + " |")  # fmt: skip
        paper = PAPER_CHEXPERT.get((r.model, r.init)) if with_paper and r.data_size == "full" else None
        if paper is not None:
            lines.append(f"| {r.model} | {r.init}: paper Table 2 | full | {UNDEFINED} | "
                         + " | ".join(f"{v:.2f}" for v in paper) + " |")  # fmt: skip
    lines += ["", "Test AUPRC % per pathology, mean ± std over seeds (the paper reports AUC only):", "", head, rule]
    for r in rows:
        lines.append(f"| {r.model} | {r.init} | {r.data_size} | {r.seeds} | "
                     + " | ".join(_pm(*r.auprc[p]) for p in pathologies) + " |")  # fmt: skip
    note = CHEXPERT_SPLIT_NOTE if with_paper else "The paper's Table 2 is on CheXpert; it does not apply to this data."
    return "\n".join(lines) + "\n\n" + note + "\n"


WEAK_MARK = " (weak source)"


def init_text(init: str, weak: bool) -> str:
    """An init as tables print it: marked when its pretrained source is weak."""
    return init + WEAK_MARK if weak else init


def _si(value: float, unit: str = "") -> str:
    if math.isnan(value):
        return "–"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".strip()


def paper_tables_markdown(rows: list[ResultRow], *, dataset: str) -> str:
    """Tables 1-3 layout: AUC and AUPRC over seeds, cost, and the paper's AUC beside ours."""
    retina = is_paper_retina(dataset)
    paper_column = PAPER_RETINA_COLUMN + " AUC %" if retina else "paper AUC %"
    lines = [
        f"| model | init | data size | seeds | test AUC % | test AUPRC % | {paper_column} "
        "| params | train FLOPs | wall s | GPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        # A weak source stands for no ImageNet: the paper's ImageNet column does not apply to it.
        paper = paper_auc(r.model, r.init, r.data_size) if retina and not r.source_weak else None
        lines.append(
            f"| {r.model} | {init_text(r.init, r.source_weak)} | {r.data_size} | {r.seeds} | {r.auc_text()} "
            f"| {r.auprc_text()} | "
            f"{'–' if paper is None else f'{paper:.1f}'} | {_si(r.params)} | {_si(r.train_flops)} | "
            f"{r.train_seconds:.0f} | {0 if math.isnan(r.gpu_seconds) else r.gpu_seconds:.0f} |"
        )
    sources = list(dict.fromkeys(f"{r.init}: {r.source}" for r in rows if r.source))
    if sources:
        lines += ["", "Pretrained sources (accuracy on their own held-out images):", ""]
        lines += [f"- {text}" for text in sources]
    if retina:
        note = (
            "\nThe paper's column is from its private retina set (Tables 1 and 3), not EyePACS/APTOS: "
            "a different data set, compare trends, not levels.\n"
        )
    elif is_chexpert(dataset):
        note = "\nPer-pathology CheXpert AUCs beside the paper's Table 2 are in the next table.\n"
    else:
        note = "\nThe paper's numbers are for its private retina set and CheXpert; none apply to this dataset.\n"
    return "\n".join(lines) + "\n" + note


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
    heading = f"### {title}\n\n" if title else ""
    columns = ["model", "init", "data size", "seeds", "test AUC %", "test AUPRC %", "train s"]
    return heading + markdown_table(columns, (
        [r.model, init_text(r.init, r.source_weak), r.data_size, r.seeds, r.auc_text(), r.auprc_text(),
         f"{r.train_seconds:.0f}"]
        for r in rows
    ))  # fmt: skip


def plot_results(rows: list[ResultRow], path: Path, *, title: str = "Test AUC by model and init") -> Path:
    """Grouped bars: one group per model (and data size), one bar per init, std as error bars."""
    plt = pyplot()

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
            stds.append(0.0 if math.isnan(row.auc_std) else 100 * row.auc_std)
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
    return save_figure(fig, path, dpi=120)
