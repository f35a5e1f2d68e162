"""The report's opening: what the grid found, in a few sentences, and a forest plot of ΔAUC.

The sentences are generated from the same rows the tables print (the "Does transfer
help?" intervals, the convergence medians, Figure 2's similarities), so the summary
never says more than the tables: a verdict that does not survive the table's Holm
correction says so, a censored median is a bound, a comparison with one seed has no
verdict.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from transfusion.analysis.convergence import ConvergenceRow
from transfusion.analysis.plotting import pyplot, save_figure
from transfusion.analysis.similarity_figures import PairSimilarity
from transfusion.analysis.transfer_effect import (
    HELPS,
    HURTS,
    NO_DIFFERENCE,
    NOT_AFTER_HOLM,
    TOO_FEW_SEEDS,
    TransferEffectRow,
    family_verdicts,
)

# The most cells a sentence names before "and N more": a summary, not the table again.
LISTED_CELLS = 3


def _size_text(size: str) -> str:
    return "full data" if size == "full" else f"{size} images"


def _interval_text(row: TransferEffectRow) -> str:
    auc = row.auc
    return f"{row.init} {100 * auc.delta:+.1f} AUC points [{100 * auc.low:+.1f}, {100 * auc.high:+.1f}]"


def _listed(parts: list[str]) -> str:
    shown = parts[:LISTED_CELLS]
    more = len(parts) - len(shown)
    text = "; ".join(shown)
    return text + (f"; and {more} more" if more else "")


def verdict_sentences(rows: list[TransferEffectRow]) -> list[str]:
    """One sentence per verdict the table reached, naming its cells with their intervals."""
    if not rows:
        return []
    level = rows[0].auc.level
    verdicts, family = family_verdicts(rows, alpha=1 - level)
    by_verdict: dict[str, list[str]] = defaultdict(list)
    not_after_holm = 0
    for row, verdict in zip(rows, verdicts, strict=True):
        if verdict.endswith(NOT_AFTER_HOLM):
            not_after_holm += 1
            verdict = verdict.removesuffix(NOT_AFTER_HOLM)
        if verdict in (HELPS, HURTS, NO_DIFFERENCE):
            by_verdict[verdict].append(f"{row.model} at {_size_text(row.data_size)}: {_interval_text(row)}")
        else:
            by_verdict[verdict].append(f"{row.model} / {row.init} at {_size_text(row.data_size)}")
    ci = f"{level * 100:g} % CI"
    sentences = []
    if by_verdict[HELPS]:
        sentences.append(f"Transfer **helps** {_listed(by_verdict[HELPS])} (Δ over random init, {ci}).")
    if by_verdict[HURTS]:
        sentences.append(f"Transfer **hurts** {_listed(by_verdict[HURTS])} (Δ over random init, {ci}).")
    if by_verdict[NO_DIFFERENCE]:
        sentences.append(f"**No detectable difference** for {_listed(by_verdict[NO_DIFFERENCE])}.")
    if not_after_holm:
        sentences.append(
            f"{not_after_holm} of these verdict(s) do not survive a Holm correction across the table's "
            f"{family} comparisons (marked {NOT_AFTER_HOLM} there)."
        )
    if by_verdict[TOO_FEW_SEEDS]:
        sentences.append(f"No verdict with one seed for {_listed(by_verdict[TOO_FEW_SEEDS])}.")
    undefined = [cells for verdict, cells in by_verdict.items() if verdict not in (HELPS, HURTS, NO_DIFFERENCE,
                                                                                   TOO_FEW_SEEDS)]  # fmt: skip
    if undefined:
        sentences.append(f"No number for {_listed([c for cells in undefined for c in cells])} (see the table).")
    if any(row.source_weak for row in rows):
        sentences.append("A **weak** pretrained source is in these comparisons: read its rows as a weak source's.")
    return sentences


def convergence_sentence(rows: list[ConvergenceRow], *, threshold_text: str) -> str:
    """How many steps each init took to the threshold against random init, per (model, size)."""
    cells: dict[tuple[str, str], dict[str, ConvergenceRow]] = defaultdict(dict)
    for row in rows:
        cells[(row.model, row.data_size)][row.init] = row
    parts = []
    for (model, size), inits in cells.items():
        random = inits.get("random")
        if random is None:
            continue
        others = [f"{init} {row.steps_text}" for init, row in inits.items() if init != "random"]
        if others:
            parts.append(f"{model} at {_size_text(size)}: {', '.join(others)} against random {random.steps_text}")
    if not parts:
        return ""
    return (
        f"Median steps to {threshold_text} ('> N': the median run never reached it within N steps): {_listed(parts)}."
    )


def similarity_sentence(rows: list[PairSimilarity], *, measure: str = "svcca") -> str:
    """Figure 2 in a sentence: top-layer similarity of random-random vs random-pretrained pairs."""
    cells: dict[tuple[str, str], dict[str, PairSimilarity]] = defaultdict(dict)
    for row in rows:
        if row.measure == measure and not math.isnan(row.mean):
            cells[(row.model, row.data_size)][row.comparison] = row
    parts = []
    for (model, size), comparisons in cells.items():
        rr, rp = comparisons.get("rand-rand"), comparisons.get("rand-pretrained")
        if rr is None or rp is None:
            continue
        chance = "" if math.isnan(rr.chance) else f", chance {rr.chance:.2f}"
        parts.append(f"{model} at {_size_text(size)}: random–random {rr.mean:.2f}, random–pretrained "
                     f"{rp.mean:.2f} ({rr.pairs} pairs{chance})")  # fmt: skip
    if not parts:
        return ""
    return f"Top-layer {measure.upper()} after training (Figure 2): {_listed(parts)}."


def summary_markdown(
    ran: str,
    *,
    transfer_rows: list[TransferEffectRow],
    convergence_rows: list[ConvergenceRow],
    convergence_threshold: str,
    similarity_rows: list[PairSimilarity],
) -> str:
    """The Summary section: the findings, then what was run (``ran``, one sentence from the caller)."""
    sentences = verdict_sentences(transfer_rows)
    if not transfer_rows:
        sentences.append("No transfer comparison: the grid has no random-init runs beside another init's.")
    sentences += [
        s
        for s in (
            convergence_sentence(convergence_rows, threshold_text=convergence_threshold),
            similarity_sentence(similarity_rows),
        )
        if s
    ]
    return " ".join(sentences) + f"\n\nWhat was run: {ran}\n"


def plot_transfer_forest(rows: list[TransferEffectRow], path: Path) -> Path | None:
    """ΔAUC ± CI per (model, size, init) against a zero line; per-seed differences as points.

    Rows without an interval (one seed, undefined) are drawn as their point only, in grey,
    and say why in their label. None when no row has a number.
    """
    drawn = [r for r in rows if not math.isnan(r.auc.delta)]
    if not drawn:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(drawn)))
    ys = list(range(len(drawn)))[::-1]
    labels = []
    for y, row in zip(ys, drawn, strict=True):
        auc = row.auc
        has_ci = not (math.isnan(auc.low) or math.isnan(auc.high)) and auc.seeds >= 2
        colour = {HELPS: "tab:green", HURTS: "tab:red"}.get(auc.verdict, "tab:blue") if has_ci else "0.55"
        if has_ci:
            ax.errorbar(100 * auc.delta, y, xerr=[[100 * (auc.delta - auc.low)], [100 * (auc.high - auc.delta)]],
                        fmt="o", color=colour, capsize=3)  # fmt: skip
        else:
            ax.plot(100 * auc.delta, y, "o", color=colour, mfc="none")
        if row.seed_deltas:  # above the bar, so they never hide it
            seeds = [100 * delta for delta in row.seed_deltas]
            ax.plot(seeds, [y + 0.22] * len(seeds), ".", color=colour, markersize=5, alpha=0.8)
        why = "" if has_ci else f" ({auc.verdict})"
        labels.append(f"{row.model} · {row.data_size} · {row.init}{why}")
    ax.axvline(0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(ys, labels)
    ax.set_xlabel(f"ΔAUC, init − random (points ×100): mean and {drawn[0].auc.level * 100:g} % CI; "
                  "dots above: each seed's paired difference")  # fmt: skip
    ax.set_title("Does transfer help? ΔAUC per cell")
    ax.set_ylim(-0.7, len(drawn) - 0.3)
    fig.tight_layout()
    return save_figure(fig, path)
