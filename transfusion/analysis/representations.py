"""Representation similarity across runs of a grid, on stored probe activations."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.records import JobRecord
from transfusion.probes import load_probe

STAGE_ORDER = re.compile(r"^(conv1|stage(\d+))$")


def ordered_layers(names: list[str]) -> list[str]:
    """conv1, stage1, stage2, ... in forward order (pool and logits left out)."""
    layers = [n for n in names if STAGE_ORDER.match(n)]
    return sorted(layers, key=lambda n: -1 if n == "conv1" else int(n[5:]))


def top_layers(names: list[str], count: int = 2) -> list[str]:
    return ordered_layers(names)[-count:]


def is_step_file(path: Path) -> bool:
    return path.stem.startswith("step-") and path.stem[5:].isdigit()


def final_probe_path(record: JobRecord) -> Path | None:
    """The probe taken at the end of training (the highest step)."""
    if record.probe_dir is None:
        return None
    steps = [(int(p.stem[5:]), p) for p in record.probe_dir.glob("step-*.npz") if is_step_file(p)]
    return max(steps)[1] if steps else None


def initial_probe_path(record: JobRecord) -> Path | None:
    if record.probe_dir is None:
        return None
    path = record.probe_dir / "step-0.npz"
    return path if path.is_file() else None


def representation(
    activations: np.ndarray, *, conv_method: str = "examples", max_examples: int | None = 4096, seed: int = 0
) -> np.ndarray:
    """(examples, features) float64 array from a stored activation (2-D or conv map)."""
    from transfusion.similarity import flatten_conv

    activations = activations.astype(np.float64)
    if activations.ndim == 4 and conv_method == "examples" and max_examples is not None:
        positions = activations.shape[0] * activations.shape[2] * activations.shape[3]
        if positions > max_examples:
            conv_method = "subsample"
    options = {"max_examples": max_examples, "seed": seed} if conv_method == "subsample" else {}
    return np.asarray(flatten_conv(activations, method=conv_method, **options), dtype=np.float64)


@dataclass(frozen=True)
class SeedSimilarityRow:
    model: str
    init: str
    data_size: str
    layer: str
    pairs: int
    mean: float
    std: float


def seed_similarity(
    records: list[JobRecord], *, measure: str = "svcca", conv_method: str = "examples"
) -> list[SeedSimilarityRow]:
    """Per model x init x data size: similarity of the top layer between pairs of seeds."""
    from transfusion.similarity import get_similarity

    similarity = get_similarity(measure)
    cells: dict[tuple[str, str, str], list[JobRecord]] = defaultdict(list)
    for record in records:
        if record.status == "FINISHED" and final_probe_path(record) is not None:
            cells[record.cell].append(record)
    rows = []
    for (model, init, size), members in cells.items():
        if len(members) < 2:
            continue
        probes = {r.seed: load_probe(final_probe_path(r)) for r in members}
        layer = top_layers(list(next(iter(probes.values()))))[-1]
        reps = {seed: representation(p[layer]) for seed, p in probes.items()}
        scores = [similarity(reps[a], reps[b]).score for a, b in itertools.combinations(sorted(reps), 2)]
        rows.append(
            SeedSimilarityRow(model, init, size, layer, len(scores), float(np.mean(scores)), float(np.std(scores)))
        )
    return rows


def seed_similarity_markdown(rows: list[SeedSimilarityRow], *, measure: str = "svcca") -> str:
    lines = [
        f"| model | init | data size | layer | seed pairs | {measure} mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.model} | {r.init} | {r.data_size} | {r.layer} | {r.pairs} | {r.mean:.3f} ± {r.std:.3f} |")
    return "\n".join(lines) + "\n"
