"""Representation similarity across runs of a grid, on stored probe activations.

Every value carries what it needs to be read: its chance level (the same measure on
pairs whose row correspondence is broken, whole images at a time, see
:func:`transfusion.similarity.chance_level`) and the rows/dims of its layer. Below
:data:`~transfusion.probes.MIN_ROWS_PER_DIM` rows per feature a CCA-family value is
mostly floor and is marked "too few rows".

The work is two fan-outs: one decomposition per (run, layer, step)
(:func:`decompose_representation`), then every pair that uses them
(:func:`compare_decompositions`). Both are pure functions of arrays and settings, so
an executor can run them serially here (:class:`SerialExecutor`) or as Ray tasks on
GPUs (``transfusion.launcher.RayAnalysisExecutor``); :class:`RepresentationCache`
plans the pairs, picks the executor and keeps the results.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from transfusion.analysis.formatting import mean_spread_text, sample_std
from transfusion.analysis.records import JobRecord
from transfusion.errors import first_line
from transfusion.probes import MIN_ROWS_PER_DIM, load_probe, probe_layers, probe_sampling

log = logging.getLogger(__name__)

STAGE_ORDER = re.compile(r"^(conv1|stage(\d+))$")
EXECUTORS = ("auto", "serial", "ray")
TOO_FEW_ROWS = "too few rows"
DEAD_LAYER = "every feature constant, a dead layer"


@dataclass(frozen=True)
class AnalysisSettings:
    """How representations are compared; logged with every analysis.

    Attributes:
        conv_method: Only for old probes that stored (N, C, H, W) maps:
            ``examples`` | ``pool`` | ``subsample`` (current probes store sampled rows).
        max_examples: Row budget for those old maps.
        svcca_keep: Variance SVCCA keeps.
        top_layers: Layers Figure 2 averages (the top stages).
        chance_repeats: Permutations per chance level.
        chance_seed: Seed of the permutations.
        min_rows_per_dim: Below this a value is marked "too few rows".
        executor: ``serial``, ``ray``, or ``auto`` (Ray once the decompositions'
            estimated work exceeds ``ray_min_flops``; Ray's start-up costs seconds).
            The interpolation analysis (:mod:`transfusion.analysis.basin`) chooses the same way.
        ray_min_flops: Threshold of ``auto``.
        interpolation_points: Values of alpha in [0, 1], evenly spaced, at which the weights
            interpolated between two runs are evaluated (0: no interpolation analysis).
        interpolation_pairs: At most this many pairs per kind (transfer-transfer,
            random-random, transfer-random) per (model, data size, block size).
    """

    conv_method: str = "examples"
    max_examples: int = 4096
    svcca_keep: float = 0.99
    top_layers: int = 2
    chance_repeats: int = 3
    chance_seed: int = 0
    min_rows_per_dim: int = MIN_ROWS_PER_DIM
    executor: str = "auto"
    ray_min_flops: float = 2e12
    interpolation_points: int = 11
    interpolation_pairs: int = 3

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}; got {self.executor!r}")
        if self.chance_repeats < 1:
            raise ValueError(f"chance_repeats must be >= 1; got {self.chance_repeats}")
        if self.interpolation_points != 0 and self.interpolation_points < 3:
            # Two points are the endpoints alone: no path between them, so no barrier to see.
            raise ValueError(f"interpolation_points must be 0 (off) or >= 3; got {self.interpolation_points}")
        if self.interpolation_pairs < 1:
            raise ValueError(f"interpolation_pairs must be >= 1; got {self.interpolation_pairs}")


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
    """(examples, features) float64 array from a stored activation (sampled rows, flat, or an old conv map)."""
    from transfusion.similarity import flatten_conv

    activations = activations.astype(np.float64)
    if activations.ndim == 4 and conv_method == "examples" and max_examples is not None:
        positions = activations.shape[0] * activations.shape[2] * activations.shape[3]
        if positions > max_examples:
            conv_method = "subsample"
    options = {"max_examples": max_examples, "seed": seed} if conv_method == "subsample" else {}
    return np.asarray(flatten_conv(activations, method=conv_method, **options), dtype=np.float64)


# ------------------------------------------------------------ per-item functions


@dataclass(frozen=True, eq=False)
class Decomposition:
    """One (run, layer, step) decomposed once; ``prepared`` is None where it is undefined.

    ``row_index`` is the (rows, 3) ``(image, h, w)`` of each conv row (None for flat
    layers and old probes); ``groups`` its image column.
    """

    prepared: object | None  # transfusion.similarity.PreparedRepresentation, on the CPU
    groups: np.ndarray | None
    rows: int
    dims: int
    error: str | None = None
    row_index: np.ndarray | None = None


@dataclass(frozen=True)
class MeasureScore:
    score: float
    chance: float
    chance_std: float


@dataclass(frozen=True)
class PairScores:
    """Every requested measure of one pair of representations, with its chance level."""

    scores: dict[str, MeasureScore]
    rows: int
    dims: int
    # Why the scores are undefined, naming the side: "first: <reason>" or "second: <reason>".
    undefined: str = ""

    @property
    def rows_per_dim(self) -> float:
        return self.rows / self.dims if self.dims else math.nan


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def decompose_representation(
    activations: np.ndarray, row_index: np.ndarray | None, settings: AnalysisSettings
) -> Decomposition:
    """Decomposes one stored representation (on the GPU when there is one); the result lives on the CPU.

    ``row_index`` is the probe's (rows, 3) ``(image, h, w)`` of each row, or only
    the (rows,) image of each row, or None.
    """
    import torch

    from transfusion.similarity import prepare

    rep = representation(activations, conv_method=settings.conv_method, max_examples=settings.max_examples)
    rows, dims = rep.shape
    if row_index is not None and len(row_index) != rows:
        row_index = None
    groups = None if row_index is None else (row_index if row_index.ndim == 1 else row_index[:, 0])
    index = row_index if row_index is not None and row_index.ndim == 2 else None
    try:
        prepared = prepare(torch.from_numpy(rep).to(_device())).to("cpu")
    except ValueError as exc:
        # A layer dead at init (every ReLU off) is common enough to be named as such.
        dead = not np.ptp(rep, axis=0).any()
        return Decomposition(None, groups, rows, dims, error=DEAD_LAYER if dead else first_line(exc), row_index=index)
    return Decomposition(prepared, groups, rows, dims, row_index=index)


def _measure_options(measure: str, settings: AnalysisSettings) -> dict:
    return {"keep": settings.svcca_keep} if measure == "svcca" else {}


def _rows_mismatch(x: Decomposition, y: Decomposition) -> str:
    """Why two representations do not hold the same rows, or ''."""
    if x.rows != y.rows:
        return f"rows differ: {x.rows} vs {y.rows}"
    if x.row_index is None and y.row_index is None:
        return ""
    if x.row_index is None or y.row_index is None or not np.array_equal(x.row_index, y.row_index):
        return "probes differ in rows (image, h, w): a different probe_seed or probe set?"
    return ""


def _same_positions(index: np.ndarray) -> bool:
    """Whether every image of a (rows, 3) ``(image, h, w)`` index holds the same positions."""
    images, counts = np.unique(index[:, 0], return_counts=True)
    if len(images) < 2 or np.any(counts != counts[0]):
        return False
    ordered = index[np.lexsort((index[:, 2], index[:, 1], index[:, 0]))][:, 1:].reshape(len(images), counts[0], 2)
    return bool((ordered == ordered[:1]).all())


def compare_decompositions(
    x: Decomposition, y: Decomposition, *, measures: tuple[str, ...], settings: AnalysisSettings
) -> PairScores:
    """Each measure of the pair and its chance level.

    The two must hold the same rows: the same ``(image, h, w)`` where the probes
    record them, else the same count; otherwise the scores are undefined and say
    why. The chance level pairs each row with the row at the same position of
    another image (:func:`~transfusion.similarity.chance_level`); probes stored
    before every image shared its positions pair whole images, rows in order.
    """
    from transfusion.similarity import similarities_with_chance

    rows, dims = x.rows, max(x.dims, y.dims)
    mismatch = _rows_mismatch(x, y)
    if x.prepared is None or y.prepared is None or mismatch:
        nan = MeasureScore(math.nan, math.nan, math.nan)
        if x.prepared is None or y.prepared is None:
            undefined = f"first: {x.error}" if x.prepared is None else f"second: {y.error}"
        else:
            undefined = mismatch
        return PairScores({m: nan for m in measures}, rows, dims, undefined)
    device = _device()
    px, py = x.prepared.to(device), y.prepared.to(device)
    same_rows = x.groups is not None and y.groups is not None and np.array_equal(x.groups, y.groups)
    groups = x.groups if same_rows and len(np.unique(x.groups)) > 1 else None
    positions = None
    if groups is not None and x.row_index is not None and _same_positions(x.row_index):
        positions = x.row_index[:, 1:]
    options = {m: _measure_options(m, settings) for m in measures}
    results = similarities_with_chance(
        px, py, measures=measures, options=options, repeats=settings.chance_repeats, seed=settings.chance_seed,
        groups=groups, positions=positions,
    )  # fmt: skip
    scores = {
        m: MeasureScore(float(r.result.score), r.chance.mean, r.chance.std) for m, r in results.items()
    }  # fmt: skip
    return PairScores(scores, rows, dims)


# ----------------------------------------------------------------- executors


@dataclass(frozen=True)
class RepresentationItem:
    """One stored representation: a layer of one probe file."""

    path: Path
    layer: str


@dataclass
class AnalysisGroup:
    """Representations of one (model, data size, layer) and the pairs among them."""

    items: list[RepresentationItem] = field(default_factory=list)
    pairs: list[tuple[int, int, tuple[str, ...]]] = field(default_factory=list)


def load_representation(item: RepresentationItem) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored activations of one layer and the (rows, 3) ``(image, h, w)`` of its rows (None when unknown)."""
    with np.load(item.path, allow_pickle=False) as data:
        activations = data[item.layer]
        rows_key = item.layer + ".rows"
        row_index = data[rows_key] if rows_key in data.files else None
    return activations, row_index


class AnalysisExecutor(Protocol):
    name: str

    def analyse(self, groups: list[AnalysisGroup], settings: AnalysisSettings) -> list[list[PairScores]]: ...


class SerialExecutor:
    """In this process, one group at a time (a group's decompositions are freed before the next)."""

    name = "serial"

    def analyse(self, groups: list[AnalysisGroup], settings: AnalysisSettings) -> list[list[PairScores]]:
        out = []
        for group in groups:
            decomposed = [decompose_representation(*load_representation(item), settings) for item in group.items]
            out.append([
                compare_decompositions(decomposed[i], decomposed[j], measures=measures, settings=settings)
                for i, j, measures in group.pairs
            ])  # fmt: skip
        return out


def decomposition_flops(groups: list[AnalysisGroup]) -> float:
    """Rough work of the decompositions: a rows x dims^2 Gram and a dims^3 eigh each."""
    total = 0.0
    for group in groups:
        for item in group.items:
            with np.load(item.path, allow_pickle=False) as data:
                shape = data[item.layer].shape
            rows = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            dims = shape[1]
            total += rows * dims * min(rows, dims) + 10 * min(rows, dims) ** 3
    return total


def choose_executor(
    settings: AnalysisSettings,
    groups: list[AnalysisGroup],
    *,
    parallel: Callable[[], AnalysisExecutor] | None = None,
) -> AnalysisExecutor:
    """Serial for small work, else ``parallel()``: the caller injects the fan-out (Ray's, from
    the launcher), so this module never imports it."""
    if settings.executor == "serial":
        return SerialExecutor()
    if parallel is None:
        if settings.executor == "ray":
            raise ValueError("analysis executor 'ray' asked for, but no parallel executor was given")
        return SerialExecutor()
    if settings.executor == "auto" and decomposition_flops(groups) < settings.ray_min_flops:
        return SerialExecutor()
    return parallel()


# ------------------------------------------------------------------ the cache


@dataclass(frozen=True)
class PairRequest:
    a: Path
    b: Path
    layer: str
    group: tuple[str, ...]
    measures: tuple[str, ...]


class RepresentationCache:
    """Plans pairs, runs them on an executor with one decomposition per (run, layer, step), keeps the scores."""

    def __init__(
        self,
        settings: AnalysisSettings | None = None,
        executor: AnalysisExecutor | None = None,
        *,
        parallel: Callable[[], AnalysisExecutor] | None = None,
    ) -> None:
        self.settings = settings or AnalysisSettings()
        self.executor = executor
        self.parallel = parallel  # the fan-out for large work (None: always serial)
        self.decompositions = 0
        self.executors_used: set[str] = set()
        self._scores: dict[tuple[Path, Path, str], PairScores] = {}
        self._layers: dict[Path, list[str]] = {}
        self._sampling: dict[str, dict] = {}

    def layers(self, path: Path) -> list[str]:
        """Analysed layers of a probe in forward order, read without loading the arrays."""
        if path not in self._layers:
            with np.load(path, allow_pickle=False) as data:
                names = list(data.files)
                if "sampling" in names:
                    rule = probe_sampling({"sampling": data["sampling"]})
                    self._sampling[rule.describe()] = {"rows_per_channel": rule.rows_per_channel, "seed": rule.seed}
            self._layers[path] = ordered_layers(probe_layers({n: None for n in names}))
        return self._layers[path]

    def probe(self, path: Path) -> dict[str, np.ndarray]:
        return load_probe(path)

    def sampling_rules(self) -> dict[str, dict]:
        """The probe sampling rules met so far (description -> values), for the analysis log."""
        return dict(self._sampling)

    def score_pairs(self, requests: list[PairRequest]) -> None:
        """Computes every request not computed yet: decompositions first, then the pairs."""
        todo: dict[tuple[Path, Path, str], PairRequest] = {}
        for r in requests:
            key = (r.a, r.b, r.layer)
            known = self._scores.get(key)
            if known is not None and all(m in known.scores for m in r.measures):
                continue
            merged = tuple(dict.fromkeys((*todo[key].measures, *r.measures))) if key in todo else r.measures
            todo[key] = PairRequest(r.a, r.b, r.layer, r.group, merged)
        if not todo:
            return
        grouped: dict[tuple[str, ...], AnalysisGroup] = defaultdict(AnalysisGroup)
        index: dict[tuple[tuple[str, ...], RepresentationItem], int] = {}
        keys: dict[tuple[str, ...], list[tuple[Path, Path, str]]] = defaultdict(list)
        for key, r in todo.items():
            group = grouped[r.group]
            slots = []
            for path in (r.a, r.b):
                item = RepresentationItem(path, r.layer)
                if (r.group, item) not in index:
                    index[(r.group, item)] = len(group.items)
                    group.items.append(item)
                slots.append(index[(r.group, item)])
            group.pairs.append((slots[0], slots[1], r.measures))
            keys[r.group].append(key)
        names = list(grouped)
        groups = [grouped[n] for n in names]
        executor = self.executor or choose_executor(self.settings, groups, parallel=self.parallel)
        self.executors_used.add(executor.name)
        items = sum(len(g.items) for g in groups)
        log.info("similarity: %d decompositions, %d pairs on %s", items, len(todo), executor.name)
        results = executor.analyse(groups, self.settings)
        self.decompositions += items
        for name, scores in zip(names, results, strict=True):
            for key, pair in zip(keys[name], scores, strict=True):
                previous = self._scores.get(key)
                merged = {**previous.scores, **pair.scores} if previous else pair.scores
                self._scores[key] = PairScores(merged, pair.rows, pair.dims, pair.undefined)

    def pair(self, a: Path, b: Path, layer: str, *, measures: tuple[str, ...] = ("svcca",), group=()) -> PairScores:
        self.score_pairs([PairRequest(a, b, layer, tuple(group) or (layer,), measures)])
        return self._scores[(a, b, layer)]

    def similarity(self, measure: str, a: Path, b: Path, layer: str) -> float:
        """The score, or NaN where it is undefined (e.g. a layer dead at init: all constant)."""
        return self.pair(a, b, layer, measures=(measure,)).scores[measure].score


def _nan_stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std of the defined values; the std is NaN (printed "–") for fewer than two."""
    values = [v for v in values if not math.isnan(v)]
    return (float(np.mean(values)), sample_std(values)) if values else (math.nan, math.nan)


def mark_value(mean: float, std: float, rows_per_dim: float, minimum: float = MIN_ROWS_PER_DIM) -> str:
    """``0.812 ± 0.010``, or that marked "too few rows" when rows/dims is below ``minimum``."""
    text = mean_spread_text(mean, std)
    return f"{TOO_FEW_ROWS}: {text}" if not rows_per_dim >= minimum else text


def undefined_note(results: list[PairScores], sides: tuple[str, str] = ("first run", "second run")) -> str:
    """Why the pairs of a table row gave no value, naming the side in the table's words, or ''."""
    for pair in results:
        if pair.undefined:
            side, _, reason = pair.undefined.partition(": ")
            name = {"first": sides[0], "second": sides[1]}.get(side)
            return f"{name}: {reason}" if name else pair.undefined
    return ""


def with_note(value: str, note: str) -> str:
    return f"{value} ({note})" if note else value


def format_chance(chance: float, chance_std: float) -> str:
    return mean_spread_text(chance, chance_std)


# ------------------------------------------------------------ seed similarity


@dataclass(frozen=True)
class SeedSimilarityRow:
    model: str
    init: str
    data_size: str
    layer: str
    pairs: int
    mean: float
    std: float
    chance: float = math.nan
    chance_std: float = math.nan
    rows_per_dim: float = math.nan
    note: str = ""  # why there is no value, when no pair gave one


def _seed_plans(records: list[JobRecord], cache: RepresentationCache) -> list[tuple]:
    cells: dict[tuple[str, str, str], list[JobRecord]] = defaultdict(list)
    for record in records:
        if record.status == "FINISHED" and final_probe_path(record) is not None:
            cells[record.cell].append(record)
    plans = []
    for (model, init, size), members in cells.items():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda r: r.seed)
        layer = top_layers(cache.layers(final_probe_path(members[0])))[-1]
        pairs = [(final_probe_path(a), final_probe_path(b)) for a, b in itertools.combinations(members, 2)]
        plans.append(((model, init, size), layer, pairs))
    return plans


def seed_similarity_requests(
    records: list[JobRecord], cache: RepresentationCache, *, measure: str = "svcca"
) -> list[PairRequest]:
    """The pairs the seed-similarity table compares, to plan one fan-out for every analysis."""
    return [
        PairRequest(a, b, layer, (model, size, layer), (measure,))
        for (model, _, size), layer, pairs in _seed_plans(records, cache) for a, b in pairs
    ]  # fmt: skip


def seed_similarity(
    records: list[JobRecord],
    *,
    measure: str = "svcca",
    conv_method: str = "examples",
    cache: RepresentationCache | None = None,
) -> list[SeedSimilarityRow]:
    """Per model x init x data size: similarity of the top layer between pairs of seeds, with its chance level."""
    cache = cache or RepresentationCache(AnalysisSettings(conv_method=conv_method))
    plans = _seed_plans(records, cache)
    cache.score_pairs(seed_similarity_requests(records, cache, measure=measure))
    rows = []
    for (model, init, size), layer, pairs in plans:
        results = [cache.pair(a, b, layer, measures=(measure,)) for a, b in pairs]
        mean, std = _nan_stats([p.scores[measure].score for p in results])
        chance, _ = _nan_stats([p.scores[measure].chance for p in results])
        chance_std, _ = _nan_stats([p.scores[measure].chance_std for p in results])
        valid = sum(not math.isnan(p.scores[measure].score) for p in results)
        note = "" if valid else undefined_note(results)
        rows.append(SeedSimilarityRow(model, init, size, layer, valid, mean, std, chance, chance_std,
                                      min(p.rows_per_dim for p in results), note))  # fmt: skip
    return rows


def seed_similarity_markdown(rows: list[SeedSimilarityRow], *, measure: str = "svcca") -> str:
    lines = [
        f"| model | init | data size | layer | seed pairs | {measure} mean ± std | rows/dims | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.init} | {r.data_size} | {r.layer} | {r.pairs}"
            f" | {with_note(mark_value(r.mean, r.std, r.rows_per_dim), r.note)} | {r.rows_per_dim:.1f}"
            f" | {format_chance(r.chance, r.chance_std)} |"
        )
    return "\n".join(lines) + "\n"
