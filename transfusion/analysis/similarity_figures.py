"""The paper's representation analyses on stored probe activations.

- Figure 2: per model, similarity of the top two layers (averaged) between runs from
  random init with different seeds (Rand-Rand) against random vs pretrained
  (Rand-Pretrained), for SVCCA, PWCCA and linear CKA. Both are built by one rule
  (:data:`FIGURE2_PAIRING`): pairs of *distinct* seeds, so neither side compares two runs
  that share a training subset, batch order and augmentation stream.
- Figure 4: per model and layer, similarity of each layer at init vs after training,
  for random and pretrained inits, and their difference.

Every value carries its chance level (drawn as a band) and the rows/dims of its
layers; a value below 10 rows per dim is marked "too few rows" in its table and
drawn hollow. Representations are (examples, features): conv layers are the seeded
(image, position) rows of the unpooled maps stored by :mod:`transfusion.probes`.
Each (run, layer, step) is decomposed once and reused by every pair it is part of
(:class:`~transfusion.analysis.representations.RepresentationCache`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.formatting import defined_mean, markdown_table, sample_std
from transfusion.analysis.plotting import pyplot, save_figure
from transfusion.analysis.records import JobRecord, source_of
from transfusion.analysis.representations import (
    AnalysisSettings,
    PairRequest,
    RepresentationCache,
    final_probe_path,
    format_chance,
    initial_probe_path,
    mark_value,
    undefined_note,
    with_note,
)

__all__ = [
    "MEASURES",
    "AnalysisSettings",
    "LayerMovement",
    "PairSimilarity",
    "RepresentationCache",
    "FIGURE2_PAIRING",
    "figure2_data",
    "figure2_markdown",
    "figure2_pairs",
    "figure4_data",
    "figure4_markdown",
    "plot_figure2",
    "plot_figure4",
]

MEASURES = ("svcca", "pwcca", "linear_cka")
RANDOM_INITS = ("random",)
CHANCE_COLOUR = "0.55"


def is_random(record: JobRecord) -> bool:
    return record.init in RANDOM_INITS


def is_pretrained(record: JobRecord) -> bool:
    return record.init not in RANDOM_INITS and record.init.split("@")[0].split("(")[0] in (
        "imagenet",
        "synthetic-transfer",
        "transfer",
    )


def pretrained_comparison(init_label: str) -> str:
    """``rand-pretrained``, or ``rand-pretrained@<source>`` in a grid over several sources."""
    source = source_of(init_label)
    return f"rand-pretrained@{source}" if source else "rand-pretrained"


@dataclass(frozen=True)
class PairSimilarity:
    model: str
    data_size: str
    comparison: str  # rand-rand | rand-pretrained
    measure: str
    mean: float
    std: float
    pairs: int
    chance: float = math.nan
    chance_std: float = math.nan
    rows_per_dim: float = math.nan  # the lowest of the averaged layers
    note: str = ""  # why there is no value, when no pair gave one


# Same-seed runs share the training subset, batch order and augmentation stream (all
# functions of the seed); Rand-Rand pairs can never be same-seed, so Rand-Pretrained
# pairs must not be either, or the two bars differ by more than the init.
FIGURE2_PAIRING = (
    "pairs of distinct seeds s < t, each once: the random-init run of seed s against the other run "
    "(random or pretrained) of seed t; Rand–Rand and Rand–Pretrained by this one rule, so both have "
    "the same pairs (n seeds: n(n-1)/2) and no pair shares a training subset, batch order or augmentation"
)


def figure2_pairs(randoms: list[JobRecord], others: list[JobRecord]) -> list[tuple[JobRecord, JobRecord]]:
    """The pairs Figure 2 averages (:data:`FIGURE2_PAIRING`): (random run of seed s, run of seed t), s < t.

    ``others`` is the random runs themselves (Rand-Rand) or one init's runs from one
    source (Rand-Pretrained); seeds missing on either side give no pair.
    """
    by_seed = {r.seed: r for r in others}
    return [(a, by_seed[t]) for a in sorted(randoms, key=lambda r: r.seed) for t in sorted(by_seed) if t > a.seed]


def _figure2_plans(records: list[JobRecord], cache: RepresentationCache) -> list[tuple]:
    groups: dict[tuple[str, str], list[JobRecord]] = defaultdict(list)
    for r in records:
        if r.status == "FINISHED" and final_probe_path(r) is not None:
            groups[(r.model, r.data_size)].append(r)
    plans = []
    for (model, size), members in groups.items():
        randoms = sorted((r for r in members if is_random(r)), key=lambda r: r.seed)
        pretrained = sorted((r for r in members if is_pretrained(r)), key=lambda r: (r.init, r.seed))
        if not randoms:
            continue
        layers = cache.layers(final_probe_path(randoms[0]))[-cache.settings.top_layers :]
        comparisons = {"rand-rand": figure2_pairs(randoms, randoms)}
        by_init: dict[str, list[JobRecord]] = defaultdict(list)
        for b in pretrained:
            by_init[b.init].append(b)
        for init, runs in by_init.items():  # one comparison per source: sources are not pooled
            comparisons.setdefault(pretrained_comparison(init), []).extend(figure2_pairs(randoms, runs))
        for comparison, pairs in comparisons.items():
            if pairs:
                paths = [(final_probe_path(a), final_probe_path(b)) for a, b in pairs]
                plans.append((model, size, comparison, layers, paths))
    return plans


def figure2_requests(records: list[JobRecord], cache: RepresentationCache) -> list[PairRequest]:
    """The pairs Figure 2 compares, to plan one fan-out for every analysis."""
    return [
        PairRequest(a, b, layer, (model, size, layer), MEASURES)
        for model, size, _, layers, paths in _figure2_plans(records, cache) for a, b in paths for layer in layers
    ]  # fmt: skip


def figure2_data(records: list[JobRecord], cache: RepresentationCache) -> list[PairSimilarity]:
    """Top-layer similarity (top layers averaged): Rand-Rand vs Rand-Pretrained, both over the
    distinct-seed pairs of :data:`FIGURE2_PAIRING` (``pairs`` counts those with a value)."""
    plans = _figure2_plans(records, cache)
    cache.score_pairs(figure2_requests(records, cache))
    rows = []
    for model, size, comparison, layers, paths in plans:
        results = [[cache.pair(a, b, layer, measures=MEASURES) for layer in layers] for a, b in paths]
        rows_per_dim = min(p.rows_per_dim for per_pair in results for p in per_pair)
        for measure in MEASURES:
            scores = [defined_mean([p.scores[measure].score for p in per_pair]) for per_pair in results]
            chances = [defined_mean([p.scores[measure].chance for p in per_pair]) for per_pair in results]
            spreads = [defined_mean([p.scores[measure].chance_std for p in per_pair]) for per_pair in results]
            valid = [v for v in scores if not math.isnan(v)]
            note = "" if valid else undefined_note([p for per_pair in results for p in per_pair])
            rows.append(PairSimilarity(model, size, comparison, measure, defined_mean(valid), sample_std(valid),
                                       len(valid), defined_mean(chances), defined_mean(spreads), rows_per_dim,
                                       note))  # fmt: skip
    return rows


@dataclass(frozen=True)
class LayerMovement:
    model: str
    data_size: str
    init: str
    layer: str
    measure: str
    mean: float
    std: float
    runs: int
    chance: float = math.nan
    chance_std: float = math.nan
    rows_per_dim: float = math.nan
    note: str = ""  # why there is no value, when no run gave one


def _figure4_plans(records: list[JobRecord], cache: RepresentationCache) -> list[tuple]:
    groups: dict[tuple[str, str, str], list[JobRecord]] = defaultdict(list)
    for r in records:
        if r.status == "FINISHED" and initial_probe_path(r) is not None and final_probe_path(r) is not None:
            groups[(r.model, r.data_size, r.init)].append(r)
    plans = []
    for (model, size, init), members in groups.items():
        members = sorted(members, key=lambda r: r.seed)
        for layer in cache.layers(final_probe_path(members[0])):
            plans.append((model, size, init, layer, [(initial_probe_path(r), final_probe_path(r)) for r in members]))
    return plans


def figure4_requests(
    records: list[JobRecord], cache: RepresentationCache, *, measure: str = "svcca"
) -> list[PairRequest]:
    """The pairs Figure 4 compares, to plan one fan-out for every analysis."""
    return [
        PairRequest(a, b, layer, (model, size, layer), (measure,))
        for model, size, _, layer, paths in _figure4_plans(records, cache) for a, b in paths
    ]  # fmt: skip


def figure4_data(
    records: list[JobRecord], cache: RepresentationCache, *, measure: str = "svcca"
) -> list[LayerMovement]:
    """Per layer: similarity of the representation at init and after training, with the layer's chance level."""
    plans = _figure4_plans(records, cache)
    cache.score_pairs(figure4_requests(records, cache, measure=measure))
    rows = []
    for model, size, init, layer, paths in plans:
        results = [cache.pair(a, b, layer, measures=(measure,)) for a, b in paths]
        valid = [p.scores[measure].score for p in results if not math.isnan(p.scores[measure].score)]
        rows.append(LayerMovement(
            model, size, init, layer, measure, defined_mean(valid), sample_std(valid), len(valid),
            defined_mean([p.scores[measure].chance for p in results]),
            defined_mean([p.scores[measure].chance_std for p in results]),
            min(p.rows_per_dim for p in results),
            "" if valid else undefined_note(results, sides=("at init", "trained")),
        ))  # fmt: skip
    return rows


def _plt():
    plt = pyplot()

    return plt


def _too_few(rows_per_dim: float, settings: AnalysisSettings | None = None) -> bool:
    minimum = (settings or AnalysisSettings()).min_rows_per_dim
    return not rows_per_dim >= minimum


def plot_figure2(rows: list[PairSimilarity], path: Path) -> Path:
    """One panel per measure; per model, Rand-Rand vs Rand-Pretrained bars, each with its chance band.

    A bar whose layers have too few rows per dim is drawn hollow.
    """
    plt = _plt()
    measures = [m for m in MEASURES if any(r.measure == m for r in rows)] or list(MEASURES)
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.6), squeeze=False)
    comparisons = ["rand-rand", *sorted({r.comparison for r in rows} - {"rand-rand"})]
    colours = {comparison: f"C{i}" for i, comparison in enumerate(comparisons)}
    width = 0.76 / len(comparisons)
    for ax, measure in zip(axes[0], measures, strict=True):
        subset = [r for r in rows if r.measure == measure]
        groups = list(dict.fromkeys((r.model, r.data_size) for r in subset))
        band_label = "chance (images permuted)"
        for i, comparison in enumerate(comparisons):
            base, _, source = comparison.partition("@")
            label = base.replace("-", "–") + (f" ({source})" if source else "")
            for g, (model, size) in enumerate(groups):
                match = [r for r in subset if (r.model, r.data_size, r.comparison) == (model, size, comparison)]
                if not match:
                    continue
                r, x = match[0], g + (i - (len(comparisons) - 1) / 2) * width
                hollow = _too_few(r.rows_per_dim)
                err = None if math.isnan(r.std) else r.std  # one pair: no spread to draw
                ax.bar(x, r.mean, width=width, yerr=err, capsize=3, color="none" if hollow else colours[comparison],
                       edgecolor=colours[comparison], hatch="//" if hollow else None, label=label)  # fmt: skip
                if not math.isnan(r.chance):
                    spread = _band_halfwidth(r.chance_std)
                    ax.fill_between([x - width / 2, x + width / 2], r.chance - spread, r.chance + spread,
                                    color=CHANCE_COLOUR, alpha=0.8, lw=0, label=band_label, zorder=3)  # fmt: skip
                    ax.hlines(r.chance, x - width / 2, x + width / 2, colors="k", linestyles="--", lw=1, zorder=4)
                label, band_label = None, None
        ax.set_xticks(range(len(groups)))
        ax.set_xlim(-0.7, len(groups) - 0.3)
        ax.set_xticklabels([f"{m}\n{s}" for m, s in groups], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{measure}: top layers")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Figure 2: Rand–Rand vs Rand–Pretrained (dashed + grey band: chance; hollow: too few rows)")
    fig.text(0.5, 0.01, "Pairs: " + FIGURE2_PAIRING + ".", ha="center", va="bottom", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, path, dpi=110)


def _band_halfwidth(chance_std):
    """Two standard deviations of the chance level, at least 0.01 so a band stays visible."""
    return np.maximum(2 * np.asarray(chance_std, dtype=float), 0.01)


def _per_layer(line: dict[str, LayerMovement], layers: list[str], attr: str, default: float = math.nan) -> np.ndarray:
    return np.array([getattr(line[layer], attr) if layer in line else default for layer in layers], dtype=float)


def plot_figure4(rows: list[LayerMovement], path: Path) -> Path:
    """One panel per model: similarity(init, trained) per layer, one line per init, with each layer's chance band.

    Markers of layers with too few rows per dim are hollow.
    """
    plt = _plt()
    models = list(dict.fromkeys((r.model, r.data_size) for r in rows))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.2 * max(1, len(models)), 3.6), squeeze=False)
    for ax, (model, size) in zip(axes[0], models, strict=False):
        subset = [r for r in rows if (r.model, r.data_size) == (model, size)]
        layers = list(dict.fromkeys(r.layer for r in subset))
        xs = np.arange(len(layers))
        for colour, init in enumerate(dict.fromkeys(r.init for r in subset)):
            line = {r.layer: r for r in subset if r.init == init}
            ys, es = _per_layer(line, layers, "mean"), _per_layer(line, layers, "std", 0.0)
            chance, spread = _per_layer(line, layers, "chance"), _per_layer(line, layers, "chance_std", 0.0)
            too_few = np.array([_too_few(v) for v in _per_layer(line, layers, "rows_per_dim")])
            c = f"C{colour}"
            ax.errorbar(xs, ys, yerr=es, color=c, capsize=3, label=init)
            ax.scatter(xs[~too_few], ys[~too_few], color=c, zorder=3)
            ax.scatter(xs[too_few], ys[too_few], facecolors="none", edgecolors=c, zorder=3)
            spread = _band_halfwidth(np.nan_to_num(spread))
            ax.fill_between(xs, chance - spread, chance + spread, color=c, alpha=0.3, linewidth=0,
                            label=f"{init}: chance")  # fmt: skip
            ax.plot(xs, chance, color=c, linestyle="--", linewidth=1)
        ax.set_xticks(xs)
        ax.set_xticklabels(layers, rotation=30, fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{model} ({size})")
        ax.set_ylabel(f"{subset[0].measure if subset else 'similarity'}, init vs trained")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Figure 4: layer at init vs trained\n(dashed + band: chance; hollow: too few rows)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def figure2_markdown(rows: list[PairSimilarity]) -> str:
    """The table, then the pairing rule its ``pairs`` column counts."""
    columns = ["model", "data size", "comparison", "measure", "mean ± std", "pairs", "rows/dims", "chance"]
    table = markdown_table(columns, (
        [r.model, r.data_size, r.comparison, r.measure, with_note(mark_value(r.mean, r.std, r.rows_per_dim), r.note),
         r.pairs, f"{r.rows_per_dim:.1f}", format_chance(r.chance, r.chance_std)]
        for r in rows
    ))  # fmt: skip
    return table.rstrip("\n") + f"\n\nPairs: {FIGURE2_PAIRING}.\n"


def figure4_markdown(rows: list[LayerMovement]) -> str:
    """Per model and layer: random-init vs pretrained movement and their difference."""
    columns = ["model", "data size", "layer", "init", "similarity(init, trained)", "runs", "rows/dims", "chance"]
    lines = [markdown_table(columns, (
        [r.model, r.data_size, r.layer, r.init, with_note(mark_value(r.mean, r.std, r.rows_per_dim), r.note), r.runs,
         f"{r.rows_per_dim:.1f}", format_chance(r.chance, r.chance_std)]
        for r in rows
    )).rstrip("\n")]  # fmt: skip
    by = {(r.model, r.data_size, r.layer, r.init): r for r in rows}
    diffs = []
    for (model, size, layer, init), row in by.items():
        if init in RANDOM_INITS:
            continue
        base = by.get((model, size, layer, "random"))
        if base is not None:
            value = f"{row.mean - base.mean:+.3f}"
            if _too_few(min(row.rows_per_dim, base.rows_per_dim)):
                value = f"too few rows: {value}"
            diffs.append(f"| {model} | {size} | {layer} | {init} − random | {value} |")
    if diffs:
        lines += ["", "| model | data size | layer | difference | value |", "|---|---|---|---|---|", *diffs]
    return "\n".join(lines) + "\n"
