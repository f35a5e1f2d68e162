"""How far from init, and from the source: per layer, beside Figure 4.

Figure 4 compares each layer's representation at init and after training. Two more
measures say how far a fine-tuned network went:

- *Weight distance from init*: per named stage (conv1, stage1..K), the relative distance
  ``||W_final - W_init|| / ||W_init||`` over the stage's parameters, which every job logs
  at its end (``distance/<stage>``, :func:`transfusion.train.distances_from_init`); for a
  transfer run, W_init is the source's weights. Mean ± sample std over seeds.
- *Feature similarity to the source*: linear CKA between a transfer run's final probe and
  the probe of its source network (the transferred weights with the source's own
  batch-norm statistics, ``probes/source.npz``, :func:`transfusion.train.probe_source`) on
  the same probe images and (image, h, w) rows, with the layer's chance level. Mean ±
  sample std over seeds. Runs that stored no source probe (older runs, inits that do not
  copy the whole source) have none.

Input: :class:`~transfusion.analysis.records.JobRecord` s with their metrics and probes.
Output: one :class:`LayerDistanceRow` per (model, data size, init, layer).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.formatting import defined_mean, markdown_table, mean_spread_text, sample_std
from transfusion.analysis.plotting import pyplot, save_figure
from transfusion.analysis.records import JobRecord
from transfusion.analysis.representations import (
    PairRequest,
    RepresentationCache,
    final_probe_path,
    format_chance,
    mark_value,
    ordered_layers,
    undefined_note,
    with_note,
)
from transfusion.train import DISTANCE_PREFIX, SOURCE_PROBE_TAG

SOURCE_DISTANCE_TITLE = "How far from init and from the source"
SOURCE_MEASURE = "linear_cka"


def source_probe_path(record: JobRecord) -> Path | None:
    """The probe of the run's source network (transfer runs that stored one), or None."""
    if record.probe_dir is None:
        return None
    path = record.probe_dir / f"{SOURCE_PROBE_TAG}.npz"
    return path if path.is_file() else None


@dataclass(frozen=True)
class LayerDistanceRow:
    """One layer of one (model, data size, init): each run's weight distance from init, and the
    similarity of its trained features to its source's (transfer runs only)."""

    model: str
    data_size: str
    init: str
    layer: str
    distances: tuple[float, ...]  # per run with the metric, in seed order
    source_similarity: float = math.nan  # linear CKA(source, trained), mean over runs
    source_similarity_std: float = math.nan
    source_runs: int = 0
    chance: float = math.nan
    chance_std: float = math.nan
    rows_per_dim: float = math.nan
    note: str = ""  # why there is no similarity to the source, when runs had source probes but no value


def _cells(records: list[JobRecord]) -> dict[tuple[str, str, str], list[JobRecord]]:
    """Finished runs by (model, data size, init), in the order the records first name each of the three."""
    cells: dict[tuple[str, str, str], list[JobRecord]] = defaultdict(list)
    for r in records:
        if r.status == "FINISHED":
            cells[(r.model, r.data_size, r.init)].append(r)
    first = [list(dict.fromkeys(key[i] for key in cells)) for i in range(3)]
    order = sorted(cells, key=lambda key: tuple(first[i].index(key[i]) for i in range(3)))
    return {key: sorted(cells[key], key=lambda r: r.seed) for key in order}


def _source_plans(records: list[JobRecord], cache: RepresentationCache) -> list[tuple]:
    plans = []
    for (model, size, init), runs in _cells(records).items():
        paired = [(source_probe_path(r), final_probe_path(r)) for r in runs]
        paired = [(s, f) for s, f in paired if s is not None and f is not None]
        if paired:
            for layer in cache.layers(paired[0][1]):
                plans.append((model, size, init, layer, paired))
    return plans


def source_similarity_requests(records: list[JobRecord], cache: RepresentationCache) -> list[PairRequest]:
    """The (source probe, final probe) pairs to score, to plan one fan-out for every analysis."""
    return [
        PairRequest(source, final, layer, (model, size, layer), (SOURCE_MEASURE,))
        for model, size, _, layer, paths in _source_plans(records, cache) for source, final in paths
    ]  # fmt: skip


def source_distance_rows(records: list[JobRecord], cache: RepresentationCache) -> list[LayerDistanceRow]:
    """Per (model, data size, init, layer): the logged weight distances and, where source probes
    were stored, linear CKA to the source with its chance level. Empty when no run has either."""
    cache.score_pairs(source_similarity_requests(records, cache))
    similarity = {plan[:4]: plan[4] for plan in _source_plans(records, cache)}  # (model, size, init, layer): paths
    rows = []
    for (model, size, init), runs in _cells(records).items():
        logged = [k.removeprefix(DISTANCE_PREFIX) for r in runs for k in r.metrics if k.startswith(DISTANCE_PREFIX)]
        compared = [layer for (m, s, i, layer) in similarity if (m, s, i) == (model, size, init)]
        for layer in ordered_layers(list(dict.fromkeys([*logged, *compared]))):
            distances = tuple(r.metrics[DISTANCE_PREFIX + layer] for r in runs if DISTANCE_PREFIX + layer in r.metrics)
            paths = similarity.get((model, size, init, layer), [])
            if not paths:
                rows.append(LayerDistanceRow(model, size, init, layer, distances))
                continue
            results = [cache.pair(a, b, layer, measures=(SOURCE_MEASURE,)) for a, b in paths]
            scores = [p.scores[SOURCE_MEASURE] for p in results]
            valid = [s.score for s in scores if not math.isnan(s.score)]
            rows.append(LayerDistanceRow(
                model, size, init, layer, distances,
                float(np.mean(valid)) if valid else math.nan, sample_std(valid), len(valid),
                defined_mean([s.chance for s in scores]), defined_mean([s.chance_std for s in scores]),
                min(p.rows_per_dim for p in results),
                "" if valid else undefined_note(results, sides=("source", "trained")),
            ))  # fmt: skip
    return rows


def _distance_text(distances: tuple[float, ...]) -> str:
    finite = [d for d in distances if not math.isnan(d)]
    if not finite:
        return "n/a (not logged)"
    return f"{mean_spread_text(float(np.mean(finite)), sample_std(finite))} ({len(finite)})"


def source_distance_markdown(rows: list[LayerDistanceRow]) -> str:
    """Per layer: weight distance from init (mean ± std over runs, run count) and CKA to the source with its chance."""
    if not rows:
        return ""
    has_source = any(r.source_runs or r.note for r in rows)
    columns = ["model", "size", "init", "layer", "‖W − W₀‖ / ‖W₀‖ (runs)"]
    if has_source:
        columns += ["CKA(source, trained)", "runs", "rows/dims", "chance"]
    body = []
    for r in rows:
        line = [r.model, r.data_size, r.init, r.layer, _distance_text(r.distances)]
        if has_source:
            if r.source_runs or r.note:
                value = with_note(mark_value(r.source_similarity, r.source_similarity_std, r.rows_per_dim), r.note)
                line += [value, r.source_runs, f"{r.rows_per_dim:.1f}", format_chance(r.chance, r.chance_std)]
            else:
                line += ["–", 0, "–", "–"]
        body.append(line)
    text = (
        f"{markdown_table(columns, body)}\nDistance: relative distance of each stage's weights (conv and linear "
        "weights and biases, batch-norm affine) from the run's init, logged by the job; for a transfer run the "
        "init is the source's weights. Mean ± sample std over runs (– for one run)."
    )
    if has_source:
        text += (
            " CKA(source, trained): linear CKA between the trained network and its source network (the transferred "
            "weights with the source's batch-norm statistics, before any training) on the same probe images and "
            "rows; 1: the layer computes what the source computed (up to a rotation and scale), chance: rows paired "
            "across images. Mean ± sample std over transfer runs."
        )
    return text + "\n"


def plot_source_distance(rows: list[LayerDistanceRow], path: Path) -> Path | None:
    """Per (model, size): weight distance from init per layer, one line per init (bars: std over
    seeds); beside it, where source probes exist, CKA(source, trained) per layer with its chance band."""
    if not rows:
        return None
    plt = pyplot()
    groups = list(dict.fromkeys((r.model, r.data_size) for r in rows))
    with_source = any(r.source_runs for r in rows)
    columns = 2 if with_source else 1
    fig, axes = plt.subplots(len(groups), columns, figsize=(5.2 * columns, 3.4 * len(groups)), squeeze=False)
    for (model, size), panels in zip(groups, axes, strict=True):
        subset = [r for r in rows if (r.model, r.data_size) == (model, size)]
        layers = list(dict.fromkeys(r.layer for r in subset))
        xs = np.arange(len(layers))
        left = panels[0]
        for colour, init in enumerate(dict.fromkeys(r.init for r in subset)):
            line = {r.layer: r for r in subset if r.init == init}
            values = [[d for d in line[la].distances if not math.isnan(d)] if la in line else [] for la in layers]
            means = np.array([np.mean(v) if v else np.nan for v in values])
            spreads = np.array([sample_std(v) if len(v) > 1 else 0.0 for v in values])
            left.errorbar(xs, means, yerr=spreads, color=f"C{colour}", marker="o", capsize=3, label=init)
        left.set_xticks(xs, layers, rotation=30, fontsize=8)
        left.set_ylabel("‖W − W₀‖ / ‖W₀‖")
        left.set_title(f"{model} ({size}): weight distance from init")
        left.grid(alpha=0.3)
        left.legend(fontsize=7)
        if columns == 2:
            right = panels[1]
            for colour, init in enumerate(dict.fromkeys(r.init for r in subset)):
                line = {r.layer: r for r in subset if r.init == init and r.source_runs}
                if not line:
                    continue
                value = np.array([line[la].source_similarity if la in line else np.nan for la in layers])
                spread = np.array([line[la].source_similarity_std if la in line else np.nan for la in layers])
                chance = np.array([line[la].chance if la in line else np.nan for la in layers])
                c = f"C{colour}"
                right.errorbar(xs, value, yerr=np.nan_to_num(spread), color=c, marker="o", capsize=3, label=init)
                right.plot(xs, chance, color=c, linestyle="--", linewidth=1, label=f"{init}: chance")
            right.set_xticks(xs, layers, rotation=30, fontsize=8)
            right.set_ylim(0, 1.02)
            right.set_ylabel("linear CKA(source, trained)")
            right.set_title(f"{model} ({size}): similarity to the source")
            right.grid(alpha=0.3)
            right.legend(fontsize=7)
    fig.suptitle("How far from init and from the source (bars: std over seeds; dashed: chance)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
