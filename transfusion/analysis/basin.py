"""Same basin? Test performance along the straight line between two runs' final weights.

Neyshabur, Sedghi & Zhang (NeurIPS 2020, "What is being transferred in transfer learning?",
Sec. 3.3) interpolate ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b`` between two
trained networks: two fine-tunings of one pretrained network (transfer-transfer) show no
*performance barrier* along the path -- they lie in one basin of the loss landscape -- while
two networks trained from random init (random-random), or one of each (transfer-random), do.

Input: finished :class:`~transfusion.analysis.records.JobRecord` s, each run's
:class:`~transfusion.config.JobSpec` and stored final weights (``checkpoint/model.pt``),
and the grid's prepared data (:class:`InterpolationInputs`: fetched only for pairs not
computed before). Which pairs: :data:`BASIN_PAIRING` (:func:`interpolation_pairs`).

At each alpha (:func:`interpolation_alphas`: ``points`` evenly spaced values, 0 and 1
included), every floating tensor is interpolated (:func:`interpolate_state`; integer
counters come from the first run), batch-norm running statistics are recalibrated on the
training images the step-0 probe uses (:func:`transfusion.train.recalibrate_batch_norm` on
:func:`transfusion.train.init_bn_batches`: interpolated running statistics describe
neither network), and the whole test split is scored: macro test AUC as ``test/auc``, and
the test loss (the training loss, masked BCE or softmax CE, on unaugmented images). So
alpha = 0 and 1 are the two runs with recalibrated statistics, not their logged test AUC.

Output: an :class:`InterpolationCurve` per pair, and per (model, data size, kind) a
:class:`BasinRow` with the *barrier* of each pair (:func:`barrier`: the largest drop of the
path below the straight line between its endpoints) and its mean and spread over pairs.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from transfusion.analysis.formatting import markdown_table, mean_spread_text, sample_std
from transfusion.analysis.plotting import pyplot, save_figure
from transfusion.analysis.records import JobRecord
from transfusion.analysis.representations import AnalysisSettings
from transfusion.analysis.similarity_figures import is_pretrained, is_random
from transfusion.config import JobSpec
from transfusion.data.prepared import PreparedDataset
from transfusion.errors import first_line

log = logging.getLogger(__name__)

BASIN_TITLE = "Same basin? Interpolating between final weights"
CURVES_FILE = "interpolation_curves.json"
CURVES_FORMAT = 1
PAPER_FINDING = (
    "Neyshabur, Sedghi & Zhang (2020, Fig. 5) find no barrier between two transfer runs (transfer–transfer: "
    "one basin) and a barrier between two random-init runs and between a transfer and a random-init run"
)
BASIN_PAIRING = (
    "within one (model, data size, block size): transfer–transfer and random–random pair the runs of one init with "
    "seeds s < t; transfer–random pairs the transfer run of seed s with the random run of seed t ≠ s (same-seed runs "
    "share the training subset and batch order); each kind keeps at most `interpolation_pairs` pairs, the closest "
    "seeds first (t − s, cyclic for transfer–random, then s), so every seed takes part about equally"
)


class PairKind(enum.Enum):
    """Which inits the two ends of an interpolation come from."""

    TRANSFER_TRANSFER = "transfer–transfer"
    RANDOM_RANDOM = "random–random"
    TRANSFER_RANDOM = "transfer–random"

    @property
    def paper_expects(self) -> str:
        """What Neyshabur et al. (2020) found for this kind of pair."""
        return "no barrier" if self is PairKind.TRANSFER_TRANSFER else "barrier"


KIND_COLOURS = {PairKind.TRANSFER_TRANSFER: "tab:blue", PairKind.RANDOM_RANDOM: "tab:gray",
                PairKind.TRANSFER_RANDOM: "tab:orange"}  # fmt: skip


# ------------------------------------------------------------------ the math


def interpolation_alphas(points: int) -> tuple[float, ...]:
    """``points`` evenly spaced values from 0 to 1, both ends exact."""
    if points < 2:
        raise ValueError(f"an interpolation needs at least its two endpoints; got points={points}")
    return tuple(i / (points - 1) for i in range(points))


def interpolate_state(
    first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * first + alpha * second`` for every floating tensor of two state dicts.

    ``torch.lerp`` gives ``first`` exactly at alpha 0 and ``second`` at alpha 1. Integer
    tensors (batch-norm's ``num_batches_tracked``) cannot be interpolated and are taken from
    ``first``; the running statistics they count are recalibrated anyway.

    Raises:
        ValueError: The two differ in tensor names or shapes (naming them): not one architecture.
    """
    if first.keys() != second.keys():
        only = sorted(set(first) ^ set(second))
        raise ValueError(f"state dicts differ in tensors: {only[:5]}{' ...' if len(only) > 5 else ''}")
    mixed = {}
    for name, a in first.items():
        b = second[name]
        if a.shape != b.shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(a.shape)} in one state, {tuple(b.shape)} in the other")
        mixed[name] = torch.lerp(a, b.to(a.dtype), float(alpha)) if a.is_floating_point() else a.clone()
    return mixed


def barrier(values: Sequence[float], *, alphas: Sequence[float] | None = None, higher_is_better: bool = True) -> float:
    """The largest drop of a path below the straight line between its endpoints.

    ``max over alpha of (line(alpha) - value(alpha))`` with ``line`` the linear interpolation
    of the first and last values, for a metric where higher is better (AUC); for one where
    lower is better (loss), the largest rise above the line. The line meets the path at both
    ends, so a barrier is never negative, and it is exactly 0 for a flat path (two copies of
    one network) or one that never falls below its chord.

    Args:
        values: The metric at each alpha, in order of alpha.
        alphas: Where along [0, 1] each value was taken (default: evenly spaced).
        higher_is_better: False for a loss.
    """
    values_array = np.asarray(values, dtype=np.float64)
    if values_array.ndim != 1 or len(values_array) < 2:
        raise ValueError(f"a barrier needs a path of at least two values; got shape {values_array.shape}")
    if alphas is None:
        position = np.linspace(0.0, 1.0, len(values_array))
    else:
        position = np.asarray(alphas, dtype=np.float64)
        if position.shape != values_array.shape:
            raise ValueError(f"{len(position)} alphas for {len(values_array)} values")
        position = (position - position[0]) / (position[-1] - position[0])
    line = values_array[0] + position * (values_array[-1] - values_array[0])
    drop = line - values_array if higher_is_better else values_array - line
    return float(max(0.0, np.max(drop)))


# ------------------------------------------------------------------ the pairs


@dataclass(frozen=True, eq=False)
class InterpolationPair:
    """Two runs of one (model, data size, block size) to interpolate between.

    ``transfer_init`` is the transfer init this pair speaks for (its label; "" for random-random).
    """

    kind: PairKind
    transfer_init: str
    first: JobRecord
    second: JobRecord

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.first.model, self.first.data_size, self.first.block_shuffle)


def _closest_first(pairs: list[tuple[int, int]], order: list[int], *, cyclic: bool) -> list[tuple[int, int]]:
    position = {seed: i for i, seed in enumerate(order)}

    def distance(pair: tuple[int, int]) -> tuple[int, int]:
        gap = position[pair[1]] - position[pair[0]]
        return (gap % len(order) if cyclic else gap, position[pair[0]])

    return sorted(pairs, key=distance)


def interpolation_pairs(records: list[JobRecord], *, max_pairs: int) -> list[InterpolationPair]:
    """The pairs :data:`BASIN_PAIRING` names, at most ``max_pairs`` per kind and transfer init in each cell.

    Only finished random and full-transfer runs take part (other inits -- Mean-Var,
    transfusion(k) -- are neither kind the finding speaks of).
    """
    cells: dict[tuple[str, str, str], list[JobRecord]] = defaultdict(list)
    for record in records:
        if record.status == "FINISHED" and (is_random(record) or is_pretrained(record)):
            cells[(record.model, record.data_size, record.block_shuffle)].append(record)
    out: list[InterpolationPair] = []
    for key in cells:  # in the records' order: block sizes as the grid lists them
        by_init: dict[str, dict[int, JobRecord]] = defaultdict(dict)
        for record in cells[key]:
            by_init[record.init][record.seed] = record
        randoms = by_init.get("random", {})
        seeds_everywhere = sorted({seed for runs in by_init.values() for seed in runs})

        def same_init(runs: dict[int, JobRecord], kind: PairKind, init: str) -> list[InterpolationPair]:
            seeds = sorted(runs)
            candidates = [(s, t) for i, s in enumerate(seeds) for t in seeds[i + 1 :]]
            chosen = _closest_first(candidates, seeds, cyclic=False)[:max_pairs]
            return [InterpolationPair(kind, init, runs[s], runs[t]) for s, t in chosen]

        out += same_init(randoms, PairKind.RANDOM_RANDOM, "")
        for init in sorted(name for name in by_init if name != "random"):
            transfers = by_init[init]
            out += same_init(transfers, PairKind.TRANSFER_TRANSFER, init)
            candidates = [(s, t) for s in sorted(transfers) for t in sorted(randoms) if s != t]
            chosen = _closest_first(candidates, seeds_everywhere, cyclic=True)[:max_pairs]
            out += [InterpolationPair(PairKind.TRANSFER_RANDOM, init, transfers[s], randoms[t]) for s, t in chosen]
    return out


# ------------------------------------------------------------------ one pair's work


@dataclass(frozen=True)
class DatasetLocation:
    """The grid's prepared data as a worker finds it: the driver's folder, or its published copy
    for nodes that share no disk with the driver (:func:`transfusion.data.node_cache.dataset_for_node`)."""

    root: str
    published_uri: str | None = None


def recalibration_rule(spec: JobSpec) -> str:
    """How batch norm is recalibrated at each alpha, in words (part of what a stored curve was computed with)."""
    from transfusion.train import INIT_BN_IMAGES

    return (
        f"batch-norm statistics recalibrated at each alpha on the first {INIT_BN_IMAGES} training images, "
        f"unaugmented, in batches of {spec.train.batch_size}; test: the whole test split"
    )


@dataclass(frozen=True)
class InterpolationTask:
    """One pair's work as plain data (it crosses to a Ray task): the first run's spec fixes the
    architecture, input statistics, batch sizes and block shuffle, which both runs share."""

    spec: JobSpec
    first_run: str
    second_run: str
    alphas: tuple[float, ...]
    dataset: DatasetLocation


@dataclass(frozen=True)
class InterpolationCurve:
    """Test AUC and loss at each alpha between two runs (``first_run`` at alpha 0); ``error`` says why
    there are none. ``rule`` is :func:`recalibration_rule`: a stored curve is reused only under the same rule."""

    first_run: str
    second_run: str
    alphas: tuple[float, ...]
    aucs: tuple[float, ...] = ()
    losses: tuple[float, ...] = ()
    rule: str = ""
    error: str = ""

    @property
    def key(self) -> tuple[str, str, tuple[float, ...], str]:
        return (self.first_run, self.second_run, self.alphas, self.rule)

    @property
    def auc_barrier(self) -> float:
        """:func:`barrier` of the AUC path (a fraction); NaN without values."""
        return barrier(self.aucs, alphas=self.alphas) if self.aucs and not self.error else math.nan

    @property
    def loss_barrier(self) -> float:
        """:func:`barrier` of the loss path (its rise above the chord); NaN without values."""
        if not self.losses or self.error:
            return math.nan
        return barrier(self.losses, alphas=self.alphas, higher_is_better=False)


def scores_loss(scores: np.ndarray, targets: np.ndarray, *, multiclass: bool) -> float:
    """The training loss on test logits: masked binary cross-entropy (NaN targets ignored), or
    softmax cross-entropy for a many-class set."""
    from transfusion.train import masked_bce, multiclass_ce

    logits, labels = torch.from_numpy(np.asarray(scores, np.float32)), torch.from_numpy(np.asarray(targets, np.float32))
    return float((multiclass_ce if multiclass else masked_bce)(logits, labels))


def interpolation_curve(
    spec: JobSpec,
    dataset: PreparedDataset,
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    *,
    alphas: Sequence[float],
    device: torch.device | str = "cpu",
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(test AUCs, test losses) of the weights interpolated between ``first`` and ``second`` at each alpha.

    The model is ``spec``'s architecture (:func:`transfusion.train.create_job_model`);
    at each alpha its batch-norm statistics are recalibrated as the step-0 probe's are,
    then the test split (block-shuffled as the job's) is scored in eval mode.
    """
    from transfusion.metrics import classification_scores
    from transfusion.train import create_job_model, init_bn_batches, predict_index, recalibrate_batch_norm

    device = torch.device(device)
    model = create_job_model(spec, dataset).to(device=device, memory_format=torch.channels_last)
    index = dataset.indices("test")
    if len(index) == 0:
        raise ValueError(f"dataset {dataset.meta.get('name', '?')!r} has no test images to evaluate on")
    targets = dataset.targets[index]
    multiclass = dataset.meta.get("task") == "multiclass"
    aucs, losses = [], []
    for alpha in alphas:
        model.load_state_dict(interpolate_state(first, second, alpha))
        recalibrate_batch_norm(model, init_bn_batches(spec, dataset, device, model))
        scores = predict_index(model, dataset, index, batch_size=spec.train.eval_batch_size, device=device,
                               block=spec.block_shuffle_or_none)  # fmt: skip
        aucs.append(classification_scores(scores, targets, dataset.label_names, macro_over_defined=multiclass).auc)
        losses.append(scores_loss(scores, targets, multiclass=multiclass))
    return tuple(float(a) for a in aucs), tuple(losses)


def load_final_weights(path: Path) -> dict[str, torch.Tensor]:
    """A run's stored final weights (a state dict), on the CPU, read as data only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run_interpolation(
    task: InterpolationTask, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]
) -> InterpolationCurve:
    """One pair on this process (a Ray task or the driver), on its GPU when it has one; a pair whose
    weights do not fit one architecture gives a curve that says so instead of values."""
    from transfusion.data.node_cache import dataset_for_node

    rule = recalibration_rule(task.spec)
    try:
        dataset = dataset_for_node(task.dataset.root, task.dataset.published_uri)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        aucs, losses = interpolation_curve(task.spec, dataset, first, second, alphas=task.alphas, device=device)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: load_state_dict's key or shape mismatch
        return InterpolationCurve(task.first_run, task.second_run, task.alphas, rule=rule, error=first_line(exc))
    return InterpolationCurve(task.first_run, task.second_run, task.alphas, aucs, losses, rule)


# ------------------------------------------------------------------ executors


@dataclass(frozen=True)
class InterpolationWork:
    """A task and where its two runs' weights are on the driver; ``cell`` groups the pairs that share runs."""

    task: InterpolationTask
    first_weights: Path
    second_weights: Path
    cell: tuple[str, ...] = ()


class InterpolationExecutor(Protocol):
    name: str

    def interpolate(self, work: list[InterpolationWork]) -> list[InterpolationCurve]: ...


class SerialInterpolation:
    """In this process, pair after pair; each run's weights are read once per cell."""

    name = "serial"

    def interpolate(self, work: list[InterpolationWork]) -> list[InterpolationCurve]:
        loaded: dict[Path, dict[str, torch.Tensor]] = {}
        cell: tuple[str, ...] | None = None
        curves = []
        for item in work:
            if item.cell != cell:
                loaded.clear()  # the next cell's runs are others: free these
                cell = item.cell
            for path in (item.first_weights, item.second_weights):
                if path not in loaded:
                    loaded[path] = load_final_weights(path)
            curves.append(run_interpolation(item.task, loaded[item.first_weights], loaded[item.second_weights]))
        return curves


def interpolation_flops(work: list[InterpolationWork], dataset: PreparedDataset) -> float:
    """Rough work: forwards of the recalibration and test images at every alpha of every pair."""
    from transfusion.cost import forward_flops
    from transfusion.train import INIT_BN_IMAGES, create_job_model

    per_image: dict[str, float] = {}
    images = min(INIT_BN_IMAGES, len(dataset.indices("train"))) + len(dataset.indices("test"))
    total = 0.0
    for item in work:
        name = item.task.spec.model
        if name not in per_image:
            model = create_job_model(item.task.spec, dataset)
            flops = forward_flops(model, in_channels=dataset.in_channels, resolution=dataset.resolution)
            per_image[name] = float(flops)
        total += per_image[name] * images * len(item.task.alphas)
    return total


def choose_interpolation_executor(
    settings: AnalysisSettings,
    work: list[InterpolationWork],
    dataset: PreparedDataset,
    *,
    parallel: Callable[[], InterpolationExecutor] | None = None,
) -> InterpolationExecutor:
    """As the similarity analysis chooses (``settings.executor``): serial for small work, else
    ``parallel()`` (the launcher's Ray executor, injected so this module never imports Ray)."""
    if settings.executor == "serial":
        return SerialInterpolation()
    if parallel is None:
        if settings.executor == "ray":
            raise ValueError("analysis executor 'ray' asked for, but no parallel executor was given")
        return SerialInterpolation()
    if settings.executor == "auto" and interpolation_flops(work, dataset) < settings.ray_min_flops:
        return SerialInterpolation()
    return parallel()


# ------------------------------------------------------------------ planning, caching


@dataclass(frozen=True)
class InterpolationInputs:
    """What interpolation reads besides the records, each fetched only for pairs not computed before.

    Attributes:
        jobs: Each run's job spec by ``job_key`` (the records carry it).
        final_weights: A run id to a local file of the run's final weights (``checkpoint/model.pt``,
            downloaded on first use); raises ``FileNotFoundError`` for a run that stored none.
        dataset: The grid's prepared data, prepared or found on first use.
    """

    jobs: Mapping[str, JobSpec]
    final_weights: Callable[[str], Path]
    dataset: Callable[[], DatasetLocation]


def read_curves(path: Path) -> list[InterpolationCurve]:
    """The curves an earlier analysis stored (none when the file is missing or of another format)."""
    if not path.is_file():
        return []
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("ignoring unreadable %s", path)
        return []
    if payload.get("format") != CURVES_FORMAT:
        return []
    return [
        InterpolationCurve(c["first_run"], c["second_run"], tuple(c["alphas"]), tuple(c["aucs"]), tuple(c["losses"]),
                           c["rule"], c.get("error", ""))
        for c in payload.get("curves", [])
    ]  # fmt: skip


def write_curves(path: Path, curves: list[InterpolationCurve]) -> Path:
    """Stores curves for a later analysis to reuse (with :func:`read_curves`)."""
    path.write_text(json.dumps({"format": CURVES_FORMAT, "curves": [asdict(c) for c in curves]}, indent=1))
    return path


@dataclass
class BasinResult:
    """The pairs, their curves (by pair, in order) and how they were computed."""

    pairs: list[InterpolationPair] = field(default_factory=list)
    curves: list[InterpolationCurve] = field(default_factory=list)
    computed: int = 0  # curves computed by this analysis (the rest were stored ones)
    executor: str = ""


def interpolate_pairs(
    records: list[JobRecord],
    inputs: InterpolationInputs,
    settings: AnalysisSettings,
    *,
    known: Sequence[InterpolationCurve] = (),
    parallel: Callable[[], InterpolationExecutor] | None = None,
) -> BasinResult:
    """Every pair's curve: a stored one (``known``, same runs, alphas and rule) or computed now.

    Weights are fetched only for pairs to compute, and the data only when one is left with
    both runs' weights, so a re-analysis whose curves are all stored reads no image.
    """
    result = BasinResult()
    if settings.interpolation_points == 0:
        return result
    alphas = interpolation_alphas(settings.interpolation_points)
    stored = {curve.key: curve for curve in known if not curve.error}
    todo: list[tuple[int, InterpolationPair, JobSpec]] = []
    for pair in interpolation_pairs(records, max_pairs=settings.interpolation_pairs):
        spec = inputs.jobs.get(pair.first.job_key)
        if spec is None or pair.second.job_key not in inputs.jobs:
            continue  # a run of another grid's jobs: nothing says how it read its images
        result.pairs.append(pair)
        result.curves.append(stored.get((pair.first.run_id, pair.second.run_id, alphas, recalibration_rule(spec))))
        if result.curves[-1] is None:
            todo.append((len(result.pairs) - 1, pair, spec))
    if not todo:
        return result
    work: list[tuple[int, InterpolationWork]] = []
    location: DatasetLocation | None = None
    statistics: dict[tuple[str, str | None], tuple] = {}
    for index, pair, spec in todo:
        runs = (pair.first.run_id, pair.second.run_id)
        try:
            paths = (inputs.final_weights(runs[0]), inputs.final_weights(runs[1]))
        except FileNotFoundError as exc:
            why = f"no stored final weights: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            result.curves[index] = InterpolationCurve(*runs, alphas, rule=recalibration_rule(spec), error=why)
            continue
        if _reads_inputs_as(spec, statistics) != _reads_inputs_as(inputs.jobs[pair.second.job_key], statistics):
            why = "the two runs normalise their inputs differently"
            result.curves[index] = InterpolationCurve(*runs, alphas, rule=recalibration_rule(spec), error=why)
            continue
        location = location or inputs.dataset()
        task = InterpolationTask(spec, pair.first.run_id, pair.second.run_id, alphas, location)
        work.append((index, InterpolationWork(task, *paths, cell=pair.cell)))
    if work:
        items = [item for _, item in work]
        dataset = PreparedDataset.open(location.root)
        executor = choose_interpolation_executor(settings, items, dataset, parallel=parallel)
        log.info("interpolation: %d pairs x %d alphas on %s", len(items), len(alphas), executor.name)
        for (index, _), curve in zip(work, executor.interpolate(items), strict=True):
            result.curves[index] = curve
        result.computed, result.executor = len(items), executor.name
    return result


def _reads_inputs_as(spec: JobSpec, cache: dict[tuple[str, str | None], tuple]) -> tuple:
    """(mean, std) the spec's model normalises inputs with: its source's, else its architecture's own."""
    from transfusion.models import create_model
    from transfusion.train import input_statistics

    key = (spec.model, spec.pretrained)
    if key not in cache:
        statistics = input_statistics(spec)
        if statistics is None:
            model = create_model(spec.model, num_classes=1)
            statistics = (tuple(model.input_mean), tuple(model.input_std))
        cache[key] = statistics
    return cache[key]


# ------------------------------------------------------------------ summary, table, figure


@dataclass(frozen=True)
class BasinRow:
    """One kind of pair in one (model, data size): each pair's barrier, and the mean path.

    Barriers in AUC (a fraction; tables print points) and in test loss; ``curves`` are the
    pairs with values (``pairs`` counts them), ``note`` why none has, when none has.
    """

    model: str
    data_size: str
    kind: PairKind
    transfer_init: str
    curves: tuple[InterpolationCurve, ...]
    note: str = ""

    @property
    def pairs(self) -> int:
        return len(self.curves)

    @property
    def auc_barriers(self) -> list[float]:
        return [c.auc_barrier for c in self.curves]

    @property
    def loss_barriers(self) -> list[float]:
        return [c.loss_barrier for c in self.curves]

    @property
    def label(self) -> str:
        """The pair as the table names it: ``imagenet–random``, ``random–random``."""
        if self.kind is PairKind.RANDOM_RANDOM:
            return "random–random"
        other = self.transfer_init if self.kind is PairKind.TRANSFER_TRANSFER else "random"
        return f"{self.transfer_init}–{other}"

    def mean_path(self, attribute: str) -> np.ndarray:
        return np.mean([getattr(c, attribute) for c in self.curves], axis=0) if self.curves else np.array([])


def basin_rows(result: BasinResult) -> list[BasinRow]:
    """Per (model, data size, kind, transfer init), the pairs' curves; a row also when every pair failed."""
    grouped: dict[tuple, list[InterpolationCurve]] = {}
    failed: dict[tuple, str] = {}
    for pair, curve in zip(result.pairs, result.curves, strict=True):
        key = (pair.first.model, pair.first.data_size, pair.first.block_shuffle, pair.transfer_init, pair.kind)
        grouped.setdefault(key, [])
        if curve.error:
            failed.setdefault(key, curve.error)
        else:
            grouped[key].append(curve)
    kinds, cells = list(PairKind), list(dict.fromkeys(key[:3] for key in grouped))
    rows = []
    # Cells in the pairs' order; in each, random-random first, then per transfer init its two kinds.
    for key in sorted(grouped, key=lambda k: (cells.index(k[:3]), k[3], kinds.index(k[4]))):
        model, size, _, init, kind = key
        rows.append(BasinRow(model, size, kind, init, tuple(grouped[key]), "" if grouped[key] else failed.get(key, "")))
    return rows


def _points_text(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    return mean_spread_text(float(np.mean(finite)) if finite else math.nan, sample_std(finite), scale=100, digits=2)


def _loss_text(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    return mean_spread_text(float(np.mean(finite)) if finite else math.nan, sample_std(finite), digits=4)


def basin_markdown(rows: list[BasinRow], *, points: int) -> str:
    """Per pair kind: barriers (mean ± std over pairs, and the largest), the endpoints' and the path's lowest AUC."""
    if not rows:
        return ""
    body = []
    for r in rows:
        endpoints = [0.5 * (c.aucs[0] + c.aucs[-1]) for c in r.curves]
        lowest = [min(c.aucs) for c in r.curves]
        largest = max(r.auc_barriers) if r.curves else math.nan
        body.append([
            r.model, r.data_size, r.label, r.pairs, _points_text(r.auc_barriers),
            "n/a" if math.isnan(largest) else f"{100 * largest:.2f}", _loss_text(r.loss_barriers),
            _points_text(endpoints), _points_text(lowest), r.kind.paper_expects,
        ] if r.curves else [r.model, r.data_size, r.label, 0, f"n/a ({r.note})", "n/a", "n/a", "n/a", "n/a",
                            r.kind.paper_expects])  # fmt: skip
    table = markdown_table(
        ["model", "size", "pair", "pairs", "AUC barrier (points) mean ± std", "largest", "loss barrier mean ± std",
         "AUC at the ends (points)", "lowest AUC on the path (points)", "paper"],
        body,
    )  # fmt: skip
    return (
        f"{table}\nEach pair: the final weights of two runs interpolated at {points} evenly spaced α in [0, 1], "
        "batch-norm statistics recalibrated at each α on the training images the step-0 probe uses, the whole test "
        "split scored. Barrier: the largest drop of test AUC below the straight line between the two ends (points, "
        "×100), or the largest rise of test loss above it; 0 when the path never dips. Mean ± sample std over the "
        f"pairs (– for one pair). Pairs: {BASIN_PAIRING}. Paper: {PAPER_FINDING}.\n"
    )


def plot_basin(rows: list[BasinRow], path: Path) -> Path | None:
    """Per (model, size) a row of two panels, test AUC and test loss against alpha: each pair a thin
    line, each kind's mean over pairs a thick one."""
    rows = [r for r in rows if r.curves]
    if not rows:
        return None
    plt = pyplot()
    groups = list(dict.fromkeys((r.model, r.data_size) for r in rows))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.3 * len(groups)), squeeze=False)
    for (model, size), (left, right) in zip(groups, axes, strict=True):
        subset = [r for r in rows if (r.model, r.data_size) == (model, size)]
        for ax, attribute, ylabel in ((left, "aucs", "test AUC"), (right, "losses", "test loss")):
            for r in subset:
                colour = KIND_COLOURS[r.kind]
                for curve in r.curves:
                    ax.plot(curve.alphas, getattr(curve, attribute), color=colour, alpha=0.3, linewidth=0.8)
                ax.plot(r.curves[0].alphas, r.mean_path(attribute), "-o", color=colour, markersize=3,
                        label=f"{r.label} (mean of {r.pairs})")  # fmt: skip
            ax.set_xlabel("α (0: first run, 1: second run)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        left.set_title(f"{model}, {size}: test AUC along the path")
        right.set_title(f"{model}, {size}: test loss along the path")
    title = "Same basin? Interpolated final weights (thin: pairs, thick: mean per kind).\n"
    fig.suptitle(title + "Paper: no barrier transfer–transfer; a barrier random–random and transfer–random", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
