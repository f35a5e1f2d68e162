"""The paper's representation analyses on stored probe activations.

- Figure 2: per model, similarity of the top two layers (averaged) between runs from
  random init with different seeds (Rand-Rand) against random vs pretrained
  (Rand-ImNet).
- Figure 4: per model and layer, similarity of each layer at init vs after training,
  for random and pretrained inits, and their difference.

Representations are (examples, features): conv maps become positions-as-examples
(subsampled to a maximum, the same positions for every run) or are average-pooled,
a config value logged with the analysis. Each (run, layer, step) is decomposed once
(:func:`transfusion.similarity.prepare`) and reused by every pair it is part of.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.plotting import pyplot, save_figure
from transfusion.analysis.records import JobRecord
from transfusion.analysis.representations import (
    final_probe_path,
    initial_probe_path,
    ordered_layers,
    representation,
)
from transfusion.probes import load_probe

MEASURES = ("svcca", "pwcca", "linear_cka")
RANDOM_INITS = ("random",)


@dataclass(frozen=True)
class AnalysisSettings:
    """How representations are compared; logged with every analysis."""

    conv_method: str = "examples"  # examples | pool | subsample
    max_examples: int = 4096
    svcca_keep: float = 0.99
    top_layers: int = 2


class RepresentationCache:
    """One decomposition per (run, layer, step), shared by every comparison."""

    def __init__(self, settings: AnalysisSettings) -> None:
        self.settings = settings
        self._probes: dict[Path, dict[str, np.ndarray]] = {}
        self._prepared: dict[tuple[Path, str], object] = {}
        self.decompositions = 0

    def probe(self, path: Path) -> dict[str, np.ndarray]:
        if path not in self._probes:
            self._probes[path] = load_probe(path)
        return self._probes[path]

    def prepared(self, path: Path, layer: str):
        from transfusion.similarity import prepare

        key = (path, layer)
        if isinstance(self._prepared.get(key), ValueError):
            raise self._prepared[key]
        if key not in self._prepared:
            rep = representation(
                self.probe(path)[layer],
                conv_method=self.settings.conv_method,
                max_examples=self.settings.max_examples,
            )
            self.decompositions += 1
            try:
                self._prepared[key] = prepare(rep)
            except ValueError as exc:
                self._prepared[key] = exc
                raise
        return self._prepared[key]

    def similarity(self, measure: str, a: Path, b: Path, layer: str) -> float:
        """The score, or NaN where it is undefined (e.g. a layer dead at init: all constant)."""
        from transfusion import similarity

        try:
            x, y = self.prepared(a, layer), self.prepared(b, layer)
        except ValueError:
            return math.nan
        if measure == "svcca":
            return similarity.svcca(x, y, keep=self.settings.svcca_keep).score
        return similarity.get_similarity(measure)(x, y).score


def is_random(record: JobRecord) -> bool:
    return record.init in RANDOM_INITS


def is_pretrained(record: JobRecord) -> bool:
    return record.init not in RANDOM_INITS and record.init.split("(")[0] in (
        "imagenet",
        "synthetic-transfer",
        "transfer",
    )


@dataclass(frozen=True)
class PairSimilarity:
    model: str
    data_size: str
    comparison: str  # rand-rand | rand-pretrained
    measure: str
    mean: float
    std: float
    pairs: int


def figure2_data(records: list[JobRecord], cache: RepresentationCache) -> list[PairSimilarity]:
    """Top-layer similarity: Rand-Rand across seeds vs Rand-Pretrained."""
    groups: dict[tuple[str, str], list[JobRecord]] = defaultdict(list)
    for r in records:
        if r.status == "FINISHED" and final_probe_path(r) is not None:
            groups[(r.model, r.data_size)].append(r)
    rows = []
    for (model, size), members in groups.items():
        randoms = [r for r in members if is_random(r)]
        pretrained = [r for r in members if is_pretrained(r)]
        if not randoms:
            continue
        layers = ordered_layers(list(cache.probe(final_probe_path(randoms[0]))))[-cache.settings.top_layers :]
        comparisons = {
            "rand-rand": list(itertools.combinations(randoms, 2)),
            "rand-pretrained": [(a, b) for a in randoms for b in pretrained],
        }
        for comparison, pairs in comparisons.items():
            if not pairs:
                continue
            for measure in MEASURES:
                scores = [
                    _nanmean(
                        [cache.similarity(measure, final_probe_path(a), final_probe_path(b), layer) for layer in layers]
                    )
                    for a, b in pairs
                ]
                valid = [v for v in scores if not math.isnan(v)]
                rows.append(
                    PairSimilarity(model, size, comparison, measure, _nanmean(valid), _nanstd(valid), len(valid))
                )
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


def figure4_data(
    records: list[JobRecord], cache: RepresentationCache, *, measure: str = "svcca"
) -> list[LayerMovement]:
    """Per layer: similarity of the representation at init and after training."""
    groups: dict[tuple[str, str, str], list[JobRecord]] = defaultdict(list)
    for r in records:
        if r.status == "FINISHED" and initial_probe_path(r) is not None and final_probe_path(r) is not None:
            groups[(r.model, r.data_size, r.init)].append(r)
    rows = []
    for (model, size, init), members in groups.items():
        layers = ordered_layers(list(cache.probe(final_probe_path(members[0]))))
        for layer in layers:
            scores = [cache.similarity(measure, initial_probe_path(r), final_probe_path(r), layer) for r in members]
            valid = [v for v in scores if not math.isnan(v)]
            rows.append(LayerMovement(model, size, init, layer, measure, _nanmean(valid), _nanstd(valid), len(valid)))
    return rows


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _nanstd(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.std(values)) if values else math.nan


def _plt():
    plt = pyplot()

    return plt


def plot_figure2(rows: list[PairSimilarity], path: Path) -> Path:
    """One panel per similarity measure; per model, Rand-Rand vs Rand-Pretrained bars."""
    plt = _plt()
    measures = [m for m in MEASURES if any(r.measure == m for r in rows)] or list(MEASURES)
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.6), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        subset = [r for r in rows if r.measure == measure]
        groups = list(dict.fromkeys((r.model, r.data_size) for r in subset))
        for i, comparison in enumerate(("rand-rand", "rand-pretrained")):
            xs, ys, es = [], [], []
            for g, (model, size) in enumerate(groups):
                match = [r for r in subset if (r.model, r.data_size, r.comparison) == (model, size, comparison)]
                if match:
                    xs.append(g + (i - 0.5) * 0.38)
                    ys.append(match[0].mean)
                    es.append(match[0].std)
            ax.bar(xs, ys, width=0.38, yerr=es, capsize=3, label=comparison.replace("-", "–"))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{m}\n{s}" for m, s in groups], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{measure}: top layers")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 2: representation similarity, Rand–Rand vs Rand–Pretrained")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_figure4(rows: list[LayerMovement], path: Path) -> Path:
    """One panel per model: similarity(init, trained) per layer, one line per init."""
    plt = _plt()
    models = list(dict.fromkeys((r.model, r.data_size) for r in rows))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.2 * max(1, len(models)), 3.6), squeeze=False)
    for ax, (model, size) in zip(axes[0], models, strict=False):
        subset = [r for r in rows if (r.model, r.data_size) == (model, size)]
        layers = list(dict.fromkeys(r.layer for r in subset))
        for init in dict.fromkeys(r.init for r in subset):
            line = {r.layer: r for r in subset if r.init == init}
            ys = [line[layer].mean if layer in line else math.nan for layer in layers]
            es = [line[layer].std if layer in line else 0.0 for layer in layers]
            ax.errorbar(range(len(layers)), ys, yerr=es, marker="o", capsize=3, label=init)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{model} ({size})")
        ax.set_ylabel("similarity, init vs trained")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 4: how far each layer moves from its init")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def figure2_markdown(rows: list[PairSimilarity]) -> str:
    lines = ["| model | data size | comparison | measure | mean ± std | pairs |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.data_size} | {r.comparison} | {r.measure} | {r.mean:.3f} ± {r.std:.3f} | {r.pairs} |"
        )
    return "\n".join(lines) + "\n"


def figure4_markdown(rows: list[LayerMovement]) -> str:
    """Per model and layer: random-init vs pretrained movement and their difference."""
    lines = ["| model | data size | layer | init | similarity(init, trained) | runs |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.data_size} | {r.layer} | {r.init} | {r.mean:.3f} ± {r.std:.3f} | {r.runs} |")
    by = {(r.model, r.data_size, r.layer, r.init): r.mean for r in rows}
    diffs = []
    for (model, size, layer, init), value in by.items():
        if init in RANDOM_INITS:
            continue
        base = by.get((model, size, layer, "random"))
        if base is not None:
            diffs.append(f"| {model} | {size} | {layer} | {init} − random | {value - base:+.3f} |")
    if diffs:
        lines += ["", "| model | data size | layer | difference | value |", "|---|---|---|---|---|", *diffs]
    return "\n".join(lines) + "\n"
