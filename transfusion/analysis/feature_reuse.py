"""Feature reuse under block shuffling (Neyshabur, Sedghi & Zhang, NeurIPS 2020, Fig. 2).

A grid with a ``block_shuffle`` axis trains random init and transfer on images whose
b x b blocks are moved by one fixed permutation (:mod:`transfusion.data.block_shuffle`).
Small blocks destroy the visual features a source network learnt to detect; if the gap
transfer - random survives them, what transfers is not (only) features -- low-level
statistics, weight scale, a better-conditioned optimisation start.

Input: finished :class:`~transfusion.analysis.records.JobRecord` s with their
``block_shuffle`` and, ideally, stored test predictions. Output, per (model, data size,
transfer init, block size): the per-seed test AUCs of both inits and the gap with its
interval from :func:`~transfusion.analysis.transfer_effect.transfer_effect_table` (seeds
paired by number; DeLong test-set covariance plus seed spread when predictions are
stored, the seed spread alone otherwise), computed block size by block size so runs of
different block sizes are never paired.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from transfusion.analysis.formatting import UNDEFINED, markdown_table, mean_spread_text, sample_std
from transfusion.analysis.plotting import pyplot, save_figure
from transfusion.analysis.records import JobRecord
from transfusion.analysis.transfer_effect import RANDOM_INIT, TransferInterval, transfer_effect_table
from transfusion.data.block_shuffle import NO_SHUFFLE

FEATURE_REUSE_TITLE = "Feature reuse: transfer vs random under block shuffling"
CAPTION = (
    "If the gap survives shuffling that destroys visual features (small blocks), what transfers is not (only) features."
)


def block_order(block: str) -> tuple[int, int]:
    """Sort key from no shuffle (largest blocks) down to pixel shuffle: ``none``, 56, 16, 4, 1."""
    return (0, 0) if block == NO_SHUFFLE else (1, -int(block))


@dataclass(frozen=True)
class FeatureReuseRow:
    """One transfer init against ``random`` at one block size, for one (model, data size).

    ``random_aucs``/``transfer_aucs`` are the logged test AUCs of the paired seeds (in
    ``seeds`` order); ``gap`` is transfer - random with its interval (fractions).
    """

    model: str
    data_size: str
    init: str
    block: str
    seeds: tuple[int, ...]
    random_aucs: tuple[float, ...]
    transfer_aucs: tuple[float, ...]
    gap: TransferInterval


def _test_aucs(runs: dict[int, JobRecord], seeds: tuple[int, ...]) -> tuple[float, ...]:
    return tuple(runs[s].metrics.get("test/auc", math.nan) for s in seeds)


def feature_reuse_table(
    records: list[JobRecord], *, level: float = 0.95, replicates: int = 1000
) -> list[FeatureReuseRow]:
    """Rows for every (model, data size, transfer init, block size) with a paired random run.

    Empty when no record was block-shuffled (the grid has no ``block_shuffle`` axis).
    """
    finished = [r for r in records if r.status == "FINISHED"]
    if all(r.block_shuffle == NO_SHUFFLE for r in finished):
        return []
    by_block: dict[str, list[JobRecord]] = defaultdict(list)
    for r in finished:
        by_block[r.block_shuffle].append(r)
    rows = []
    for block in sorted(by_block, key=block_order):
        cell = by_block[block]
        seeds_of: dict[tuple[str, str, str], dict[int, JobRecord]] = defaultdict(dict)
        for r in cell:
            seeds_of[(r.model, r.data_size, r.init)][r.seed] = r
        for effect in transfer_effect_table(cell, replicates=replicates, level=level):
            transfer = seeds_of[(effect.model, effect.data_size, effect.init)]
            random = seeds_of[(effect.model, effect.data_size, RANDOM_INIT)]
            seeds = tuple(sorted(set(transfer) & set(random)))
            rows.append(FeatureReuseRow(effect.model, effect.data_size, effect.init, block, seeds,
                                        _test_aucs(random, seeds), _test_aucs(transfer, seeds),
                                        effect.auc))  # fmt: skip
    return sorted(rows, key=lambda r: (r.model, r.data_size, r.init, block_order(r.block)))


def block_cell_label(data_size: str, block: str) -> str:
    """A data size as tables show it in a grid with several block sizes: ``full`` unshuffled, ``full·b16`` shuffled.

    Display only: analyses read ``JobRecord.block_shuffle``, never this label.
    """
    return data_size if block == NO_SHUFFLE else f"{data_size}·b{block}"


def records_by_block_cell(records: list[JobRecord]) -> list[JobRecord]:
    """``records`` with shuffled runs' data size shown as :func:`block_cell_label`, when the grid has
    several block sizes, so the (model, init, size) tables never average runs of different block sizes."""
    if all(r.block_shuffle == NO_SHUFFLE for r in records):
        return records
    return [replace(r, data_size=block_cell_label(r.data_size, r.block_shuffle)) for r in records]


def _auc_text(values: tuple[float, ...]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    return mean_spread_text(float(np.mean(finite)) if finite else math.nan, sample_std(finite))


def _gap_text(gap: TransferInterval) -> str:
    if math.isnan(gap.delta):
        return UNDEFINED
    interval = "" if math.isnan(gap.low) else f" [{100 * gap.low:+.1f}, {100 * gap.high:+.1f}]"
    return f"{100 * gap.delta:+.1f}{interval}"


def feature_reuse_markdown(rows: list[FeatureReuseRow]) -> str:
    """Test AUC per init (mean ± std over seeds) and the gap in AUC points with its interval, per block size."""
    if not rows:
        return ""
    level = rows[0].gap.level
    table = markdown_table(
        ["model", "size", "init", "block", "seeds", "random AUC", "transfer AUC",
         f"gap (points) [{level * 100:g} % CI]", "verdict"],
        [[r.model, r.data_size, r.init, r.block, len(r.seeds), _auc_text(r.random_aucs), _auc_text(r.transfer_aucs),
          _gap_text(r.gap), r.gap.verdict] for r in rows],
    )  # fmt: skip
    bases = sorted({r.gap.basis for r in rows if r.gap.basis})
    basis = f" Intervals cover: {'; '.join(bases)}." if bases else ""
    return (
        f"{table}\nBlock: side in pixels of the shuffled blocks, from `none` (images as they are) to 1 "
        f"(pixel shuffle); one fixed permutation for every split, init and seed. Gap: transfer − random "
        f"test AUC in points (×100), seeds paired by number, {level * 100:g} % interval.{basis} {CAPTION}\n"
    )


def plot_feature_reuse(rows: list[FeatureReuseRow], path: Path) -> Path | None:
    """Neyshabur et al. Fig. 2: per (model, size, init) a row of two panels -- test AUC per init
    against block size (seeds as points, means as lines) and the gap with its interval band."""
    if not rows:
        return None
    plt = pyplot()
    groups = list(dict.fromkeys((r.model, r.data_size, r.init) for r in rows))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for (model, size, init), (left, right) in zip(groups, axes, strict=True):
        subset = [r for r in rows if (r.model, r.data_size, r.init) == (model, size, init)]
        x = np.arange(len(subset))
        labels = [r.block for r in subset]
        for offset, name, values, color in ((-0.06, RANDOM_INIT, "random_aucs", "tab:gray"),
                                            (0.06, init, "transfer_aucs", "tab:blue")):  # fmt: skip
            means = []
            for i, r in enumerate(subset):
                seeds = np.asarray(getattr(r, values), dtype=float)
                left.scatter(np.full(len(seeds), i + offset), seeds, s=14, color=color, alpha=0.6)
                means.append(np.nanmean(seeds) if np.isfinite(seeds).any() else np.nan)
            left.plot(x + offset, means, "-o", color=color, label=f"{name} (mean)")
        left.set_xticks(x, labels)
        left.set_xlabel("block size (px; none → pixel shuffle)")
        left.set_ylabel("test AUC")
        left.set_title(f"{model}, {size}: test AUC per init (points: seeds)")
        left.legend(fontsize=8)
        gap = np.array([100 * r.gap.delta for r in subset])
        low = np.array([100 * r.gap.low for r in subset])
        high = np.array([100 * r.gap.high for r in subset])
        level = subset[0].gap.level
        right.axhline(0.0, color="black", linewidth=0.8)
        right.fill_between(x, low, high, color="tab:blue", alpha=0.2, label=f"{level * 100:g} % interval")
        right.plot(x, gap, "-o", color="tab:blue", label="mean gap")
        right.set_xticks(x, labels)
        right.set_xlabel("block size (px; none → pixel shuffle)")
        right.set_ylabel("Δ test AUC (points)")
        right.set_title(f"{model}, {size}: gap {init} − random")
        right.legend(fontsize=8)
    fig.suptitle("Feature reuse under block shuffling. " + CAPTION, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
