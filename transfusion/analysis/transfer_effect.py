"""Does transfer help? ΔAUC and ΔAUPRC of each init against ``random``, with a calibrated CI and a verdict.

Per (model, data size), each non-random init is paired with ``random`` seed by seed:
both runs of seed s trained on the same subset and scored the same test images, so
``Δ_s = metric(init_s) - metric(random_s)`` is a paired difference. The number reported
is the mean ``Δ̄`` over the k paired seeds, and the interval is for its expectation over
training randomness *and* the test population.

The model, one sentence per choice:

- ``Δ_s = μ + T + I_s + e_s``: T is test-set noise shared by every seed (all seeds are
  scored on the same images), I_s the seed-specific test noise (seed × image
  interaction) and e_s the training noise, so ``Var(Δ̄) = σ_T² + (σ_I² + σ_e²) / k``.
- ``S²``, the sample variance of Δ_s over seeds, estimates ``σ_I² + σ_e²`` with k - 1
  degrees of freedom: the only term that needs several seeds.
- The test-sampling covariance matrix ``Σ`` of (Δ_1, ..., Δ_k), with images resampled
  jointly for all seeds, has diagonal ``σ_T² + σ_I²`` (``V_each`` is its mean) and
  off-diagonal ``σ_T²``; ``V_mean = mean(Σ)`` is the test-sampling variance of Δ̄, and
  ``σ_T² = V_mean - (V_each - V_mean) / (k - 1)``, the mean off-diagonal entry, clipped
  at 0 (the per-seed test noise is then counted once, inside S², not twice).
- ``SE² = σ_T² + S² / k`` and the interval is ``Δ̄ ± t_df · SE`` with
  Welch–Satterthwaite ``df = SE⁴ / ((S² / k)² / (k - 1))``, because σ_T² comes from
  thousands of images and counts as known while S² comes from k values.
- With one paired seed S² does not exist: the interval covers test-set noise only
  (``V_each``, normal quantile), says so, and the verdict is *too few seeds*.
- For AUC, Σ is computed in closed form from DeLong's placement values: each image's
  influence on the AUC of a label (``(V10_i - AUC) / m`` for a positive,
  ``(V01_j - AUC) / n`` for a negative) is exact to first order and costs one sort.
- A macro over labels averages the per-label influences image by image, so images that
  carry several labels count their correlation.
- With ``groups`` (a patient per image) the influences are summed within each group and
  Σ is the covariance over groups (× C / (C - 1)), so correlated images of one patient
  are not counted as independent evidence.
- For AUPRC, which has no closed form, Σ is the covariance over a (cluster) bootstrap
  whose resamples are shared by all seeds and both inits, fed into the same decomposition.
- The p-value comes from the same t statistic ``Δ̄ / SE``; a table of many cells is one
  family, and :func:`holm_adjusted` says which verdicts survive a Holm correction.
- A label whose targets hold a single class has no AUC: the macro is then NaN with the
  label named (``undefined_labels``), never the mean of the other labels.

Scores are ``(seeds, images)`` or ``(seeds, images, labels)`` arrays of logits (any
strictly monotone score without saturation: ties from a saturated sigmoid would bias the
AUC); targets are ``(images,)`` or ``(images, labels)`` in {0, 1} with NaN for an
unlabelled entry (CheXpert U-Ignore), as in :mod:`transfusion.metrics`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.formatting import UNDEFINED
from transfusion.analysis.records import JobRecord, source_of
from transfusion.metrics import RunPredictions

RANDOM_INIT = "random"
HELPS, HURTS, NO_DIFFERENCE, TOO_FEW_SEEDS = "helps", "hurts", "no detectable difference", "too few seeds"
METRICS = ("auc", "auprc")


def weighted_auc(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one label under example weights; ``weights`` is (B, N), returns (B,).

    Integer weights are bootstrap counts: the AUC of the resampled set (the Mann-Whitney
    statistic, ties counted half). NaN where a replicate holds one class only.
    """
    order = np.argsort(scores, kind="mergesort")
    ranked, positive = scores[order], targets[order] > 0.5
    starts = np.r_[0, np.flatnonzero(np.diff(ranked)) + 1]  # first example of each tie group
    w = weights[:, order]
    pos_w = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
    neg_w = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    total_pos, total_neg = pos_w.sum(axis=1), neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1) / (total_pos * total_neg)


def weighted_average_precision(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's step sum) of one label under example weights (B, N) -> (B,)."""
    order = np.argsort(-scores, kind="mergesort")
    ranked, positive = scores[order], targets[order] > 0.5
    starts = np.r_[0, np.flatnonzero(np.diff(ranked)) + 1]
    w = weights[:, order]
    pos_w = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
    all_w = np.add.reduceat(w, starts, axis=1)
    true_pos, counted = np.cumsum(pos_w, axis=1), np.cumsum(all_w, axis=1)
    total_pos = true_pos[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(counted > 0, true_pos / counted, 0.0)
        return (pos_w / total_pos * precision).sum(axis=1)


def auc_influence(targets: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """AUC of one label and each image's first-order influence on it (DeLong placement values).

    ``targets`` (N,) in {0, 1}, both classes present; returns ``(auc, influence (N,))``
    whose sum over positives and over negatives is 0 each; the test-sampling variance
    of the AUC is about the sum of squared influences.
    """
    positive = targets > 0.5
    pos, neg = scores[positive], scores[~positive]
    m, n = len(pos), len(neg)
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, "left")
    v10 = (below + 0.5 * (np.searchsorted(neg_sorted, pos, "right") - below)) / n  # ties count half
    not_above = np.searchsorted(pos_sorted, neg, "right")
    v01 = (m - not_above + 0.5 * (not_above - np.searchsorted(pos_sorted, neg, "left"))) / m
    auc = float(v10.mean())
    influence = np.empty(len(scores))
    influence[positive] = (v10 - auc) / m
    influence[~positive] = (v01 - auc) / n
    return auc, influence


def macro_auc_influence(targets: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro AUC over the labels (columns) and each image's influence on it, (N, L) -> (float, (N,)).

    An unlabelled (NaN) entry contributes nothing to its label; every label must hold both classes.
    """
    total, influence = 0.0, np.zeros(len(targets))
    for j in range(targets.shape[1]):
        keep = ~np.isnan(targets[:, j])
        auc, label_influence = auc_influence(targets[keep, j], scores[keep, j])
        total += auc
        influence[keep] += label_influence
    labels = targets.shape[1]
    return total / labels, influence / labels


def _macro_weighted(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray, metric: str) -> np.ndarray:
    """Macro mean over labels of ``metric`` per weight row (B, N) -> (B,); NaN in a replicate that drew one class."""
    function = {"auc": weighted_auc, "auprc": weighted_average_precision}[metric]
    per_label = []
    for j in range(targets.shape[1]):
        keep = ~np.isnan(targets[:, j])
        per_label.append(function(targets[keep, j], scores[keep, j], weights[:, keep]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.mean(np.stack(per_label), axis=0)


def bootstrap_counts(n: int, *, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, n) counts of each example in a resample of n with replacement."""
    draws = rng.integers(0, n, size=(replicates, n)) + n * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


# Bootstrap work per paired difference, in (example x label x seed)-replicates: 1 000
# replicates up to 20 000 test scores, fewer (never under 200) above, so a 50 000-image
# test set costs seconds per pair.
BOOTSTRAP_BUDGET = 20_000_000
MIN_REPLICATES = 200


def replicates_for(n: int, requested: int) -> int:
    return max(min(requested, MIN_REPLICATES), min(requested, BOOTSTRAP_BUDGET // max(1, n)))


@dataclass(frozen=True)
class TransferInterval:
    """The mean paired difference init - random over seeds with its CI (fractions, not points).

    ``low``/``high`` are NaN where undefined; ``se`` and ``df`` are those of the t interval
    (``df`` infinite when the test-set term is the only one), ``p_value`` that of
    ``delta / se`` against 0 (NaN with under two seeds). ``basis`` says in words what the
    interval covers; ``undefined_labels`` names labels with a single class, which make
    the macro NaN.
    """

    delta: float
    low: float
    high: float
    seeds: int
    basis: str = ""
    se: float = math.nan
    df: float = math.nan
    p_value: float = math.nan
    level: float = 0.95
    undefined_labels: tuple[str, ...] = ()
    resampled_by: str = "image"  # "patient" when test images were resampled in their groups

    @property
    def ci_low(self) -> float:
        return self.low

    @property
    def ci_high(self) -> float:
        return self.high

    @property
    def verdict(self) -> str:
        """helps / hurts when the CI excludes 0, else no detectable difference; too few seeds under 2."""
        if self.undefined_labels or math.isnan(self.delta):
            return UNDEFINED
        if self.seeds < 2:
            return TOO_FEW_SEEDS
        if math.isnan(self.low) or math.isnan(self.high):
            return UNDEFINED
        if self.low > 0:
            return HELPS
        if self.high < 0:
            return HURTS
        return NO_DIFFERENCE


# The name the first version of this module gave the same record.
EffectEstimate = TransferInterval


def _t_quantile(level: float, df: float) -> float:
    # scipy.special, not scipy.stats: the same functions without seconds of import.
    from scipy.special import ndtri, stdtrit

    upper = 1 - (1 - level) / 2
    return float(ndtri(upper) if math.isinf(df) else stdtrit(df, upper))


def _p_value(delta: float, se: float, df: float) -> float:
    from scipy.special import ndtr, stdtr

    if se == 0:
        return 0.0 if delta != 0 else 1.0
    z = abs(delta) / se
    return float(2 * (ndtr(-z) if math.isinf(df) else stdtr(df, -z)))


def combine_seed_covariance(
    deltas: np.ndarray, covariance: np.ndarray, *, level: float = 0.95, resampled_by: str = "image", what: str = ""
) -> TransferInterval:
    """The interval of the mean of ``deltas`` (k,) given their test-sampling covariance (k, k); see the module doc."""
    k = len(deltas)
    mean = float(np.mean(deltas))
    v_each = float(np.mean(np.diag(covariance)))
    tested = f"{what}test images resampled by {resampled_by}"
    if k < 2:
        half = _t_quantile(level, math.inf) * math.sqrt(v_each)
        basis = f"1 seed: {tested}; test-set noise only, training noise not covered"
        return TransferInterval(mean, mean - half, mean + half, k, basis, math.sqrt(v_each), math.inf, math.nan,
                                level, resampled_by=resampled_by)  # fmt: skip
    v_mean = float(np.mean(covariance))
    shared = max(0.0, v_mean - (v_each - v_mean) / (k - 1))  # σ_T²: the mean off-diagonal covariance
    seed_term = float(np.var(deltas, ddof=1)) / k  # (σ_I² + σ_e²) / k
    se2 = shared + seed_term
    # Welch-Satterthwaite: only the seed term is estimated from few (k - 1 df) values.
    df = se2**2 / (seed_term**2 / (k - 1)) if seed_term > 0 else math.inf
    se = math.sqrt(se2)
    half = _t_quantile(level, df) * se
    basis = f"{k} paired seeds (training noise) + {tested} (shared test-set noise)"
    return TransferInterval(mean, mean - half, mean + half, k, basis, se, df, _p_value(mean, se, df), level,
                            resampled_by=resampled_by)  # fmt: skip


def seed_spread_interval(deltas: Sequence[float], *, level: float = 0.95) -> TransferInterval:
    """Without stored test predictions: the seed spread alone (t with k - 1 df); no interval for one seed."""
    k = len(deltas)
    if k == 0:
        return TransferInterval(math.nan, math.nan, math.nan, 0, "no paired seeds", level=level)
    mean = float(np.mean(deltas))
    if k < 2:
        return TransferInterval(mean, math.nan, math.nan, 1, "1 seed, no test predictions: no interval", level=level)
    se = float(np.std(deltas, ddof=1)) / math.sqrt(k)
    half = _t_quantile(level, k - 1) * se
    basis = f"{k} seeds, seed spread only (no test predictions stored: test-set noise not covered)"
    return TransferInterval(mean, mean - half, mean + half, k, basis, se, k - 1, _p_value(mean, se, k - 1), level)


def _as_labels(array: np.ndarray, images: int, name: str) -> np.ndarray:
    if array.ndim == 1:
        return array[:, None]
    if array.ndim != 2 or array.shape[0] != images:
        raise ValueError(f"{name} must be (images,) or (images, labels) with {images} images, got {array.shape}")
    return array


def _group_codes(groups: np.ndarray | None, images: int) -> tuple[np.ndarray, int]:
    if groups is None:
        return np.arange(images), images
    groups = np.asarray(groups)
    if groups.shape != (images,):
        raise ValueError(f"groups must be one id per test image, shape ({images},), got {groups.shape}")
    _, codes = np.unique(groups, return_inverse=True)
    return codes.ravel(), int(codes.max()) + 1


def transfer_interval(
    targets: np.ndarray,
    scores: np.ndarray,
    baseline: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    level: float = 0.95,
    seed: int = 0,
    metric: str = "auc",
    replicates: int = 1000,
    label_names: Sequence[str] | None = None,
) -> TransferInterval:
    """Mean over paired seeds of ``metric(scores_s) - metric(baseline_s)`` with a calibrated CI and a verdict.

    Args:
        targets: (images,) or (images, labels) in {0, 1}; NaN for an unlabelled entry.
        scores: (seeds, images) or (seeds, images, labels) of the init, seed s paired with
            seed s of ``baseline`` (``random``), same shape.
        groups: optional (images,) cluster id (a patient): resampling is by cluster.
        level: the interval's coverage, e.g. 0.95.
        seed: seeds the AUPRC bootstrap (AUC needs none).
        metric: ``"auc"`` (closed-form DeLong covariances) or ``"auprc"`` (shared cluster bootstrap).
        replicates: bootstrap replicates for AUPRC (lowered for very large test sets).
        label_names: names for ``undefined_labels``; ``label 0``, ... by default.

    Returns:
        A :class:`TransferInterval`; with one seed the interval covers test-set noise only
        and the verdict is *too few seeds*.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    targets = np.asarray(targets, dtype=np.float64)
    images = targets.shape[0]
    targets = _as_labels(targets, images, "targets")
    scores, baseline = (np.asarray(a, dtype=np.float64) for a in (scores, baseline))
    if scores.shape != baseline.shape:
        raise ValueError(f"scores {scores.shape} and baseline {baseline.shape} must pair seed by seed (same shape)")
    if scores.ndim == 2:
        scores, baseline = scores[..., None], baseline[..., None]
    if scores.ndim != 3 or scores.shape[1:] != targets.shape:
        raise ValueError(f"scores must be (seeds, {images}) or (seeds, {images}, labels) for targets {targets.shape}, "
                         f"got {scores.shape}")  # fmt: skip
    k = scores.shape[0]
    if k == 0:
        return TransferInterval(math.nan, math.nan, math.nan, 0, "no paired seeds", level=level)
    names = list(label_names) if label_names is not None else [f"label {j}" for j in range(targets.shape[1])]
    undefined = tuple(
        names[j] for j in range(targets.shape[1]) if len(np.unique(targets[~np.isnan(targets[:, j]), j])) < 2
    )
    codes, clusters = _group_codes(groups, images)
    resampled_by = "image" if groups is None else "patient"
    if undefined:
        basis = f"macro {metric.upper()} undefined: {', '.join(undefined)} has one class in the test set"
        return TransferInterval(math.nan, math.nan, math.nan, k, basis, level=level, undefined_labels=undefined,
                                resampled_by=resampled_by)  # fmt: skip
    if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(baseline))):
        return TransferInterval(math.nan, math.nan, math.nan, k, "non-finite scores: no difference", level=level,
                                resampled_by=resampled_by)  # fmt: skip
    if clusters < 2:
        raise ValueError(f"resampling needs at least 2 groups of test images, got {clusters}")
    if metric == "auc":
        deltas, covariance = _auc_deltas_and_covariance(targets, scores, baseline, codes, clusters)
        what = ""
    else:
        deltas, covariance, used = _bootstrap_deltas_and_covariance(
            targets, scores, baseline, codes, clusters, metric=metric, replicates=replicates, seed=seed
        )
        what = f"{used} bootstrap replicates of the "
    return combine_seed_covariance(deltas, covariance, level=level, resampled_by=resampled_by, what=what)


def _auc_deltas_and_covariance(
    targets: np.ndarray, scores: np.ndarray, baseline: np.ndarray, codes: np.ndarray, clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    k = scores.shape[0]
    deltas, cluster_influence = np.empty(k), np.empty((k, clusters))
    for s in range(k):
        auc_a, influence_a = macro_auc_influence(targets, scores[s])
        auc_b, influence_b = macro_auc_influence(targets, baseline[s])
        deltas[s] = auc_a - auc_b
        cluster_influence[s] = np.bincount(codes, weights=influence_a - influence_b, minlength=clusters)
    # Influences sum to 0 over the images, so this is C / (C - 1) times their covariance over clusters.
    covariance = clusters / (clusters - 1) * (cluster_influence @ cluster_influence.T)
    return deltas, covariance


def _bootstrap_deltas_and_covariance(
    targets: np.ndarray,
    scores: np.ndarray,
    baseline: np.ndarray,
    codes: np.ndarray,
    clusters: int,
    *,
    metric: str,
    replicates: int,
    seed: int,
    chunk: int = 100,
) -> tuple[np.ndarray, np.ndarray, int]:
    k, images = scores.shape[0], len(codes)
    ones = np.ones((1, images))
    deltas = np.array([
        (_macro_weighted(targets, scores[s], ones, metric) - _macro_weighted(targets, baseline[s], ones, metric))[0]
        for s in range(k)
    ])  # fmt: skip
    replicates = replicates_for(images * targets.shape[1] * k, replicates)  # each label and seed is one more pass
    rng = np.random.default_rng(seed)
    rows = []
    for start in range(0, replicates, chunk):
        # One resample of clusters for every seed and both inits: the covariances between seeds are kept.
        weights = bootstrap_counts(clusters, replicates=min(chunk, replicates - start), rng=rng)[:, codes]
        rows.append(np.stack([
            _macro_weighted(targets, a, weights, metric) - _macro_weighted(targets, b, weights, metric)
            for a, b in zip(scores, baseline, strict=True)
        ], axis=1))  # fmt: skip
    values = np.concatenate(rows)
    values = values[np.all(np.isfinite(values), axis=1)]  # a replicate that drew one class of a label
    if len(values) < 2:
        return deltas, np.full((k, k), math.nan), len(values)
    return deltas, np.atleast_2d(np.cov(values, rowvar=False)), len(values)


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values over one family (NaN entries stay NaN and are not counted)."""
    finite = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    running, m = 0.0, len(finite)
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class TransferEffectRow:
    """One init against ``random`` for one (model, data size)."""

    model: str
    data_size: str
    init: str
    auc: TransferInterval
    auprc: TransferInterval
    test_images: int = 0
    source: str = ""
    source_weak: bool = False
    seed_deltas: tuple[float, ...] = ()  # each paired seed's logged test AUC difference, init - random


def _load_predictions(record: JobRecord) -> RunPredictions | None:
    if record.predictions is None or not Path(record.predictions).is_file():
        return None
    return RunPredictions.load(Path(record.predictions))


def _paired_interval(
    pairs: list[tuple[RunPredictions, RunPredictions]], *, metric: str, replicates: int, level: float
) -> TransferInterval:
    """The interval of one cell from its seeds' stored test predictions (all on the same images)."""
    first = pairs[0][1]
    # Groups are the same for every run of a cell when stored (the test split's patients); any run without them
    # (stored by an older version) makes the cell resample by image.
    grouped = all(p.groups is not None for pair in pairs for p in pair)
    return transfer_interval(
        first.targets,
        np.stack([a.scores for a, _ in pairs]),
        np.stack([b.scores for _, b in pairs]),
        groups=first.groups if grouped else None,
        level=level,
        metric=metric,
        replicates=replicates,
        label_names=first.label_names or None,
    )


def transfer_effect_table(
    records: list[JobRecord], *, replicates: int = 1000, level: float = 0.95
) -> list[TransferEffectRow]:
    """Every non-random init against ``random`` per (model, data size), seeds paired by number.

    Cells whose runs all stored test predictions on the same images get :func:`transfer_interval`;
    the others fall back to the spread of the logged test metrics over seeds (:func:`seed_spread_interval`).
    """
    runs: dict[tuple[str, str, str], dict[int, JobRecord]] = defaultdict(dict)
    for r in records:
        if r.status == "FINISHED":
            runs[(r.model, r.data_size, r.init)][r.seed] = r
    loaded: dict[str, RunPredictions | None] = {}

    def predictions(record: JobRecord) -> RunPredictions | None:
        if record.run_id not in loaded:
            loaded[record.run_id] = _load_predictions(record)
        return loaded[record.run_id]

    rows = []
    for (model, size, init), by_seed in runs.items():
        baseline = runs.get((model, size, RANDOM_INIT))
        if init == RANDOM_INIT or not baseline:
            continue
        seeds = sorted(set(by_seed) & set(baseline))
        pairs = [(predictions(by_seed[s]), predictions(baseline[s])) for s in seeds]
        stored = bool(seeds) and all(a is not None and b is not None for a, b in pairs)
        stored = stored and all(a.same_images(pairs[0][1]) and b.same_images(pairs[0][1]) for a, b in pairs)
        estimates = {}
        for metric in METRICS:
            if stored:
                estimates[metric] = _paired_interval(pairs, metric=metric, replicates=replicates, level=level)
            else:
                key = f"test/{metric}"
                deltas = [by_seed[s].metrics.get(key, math.nan) - baseline[s].metrics.get(key, math.nan) for s in seeds]
                estimates[metric] = seed_spread_interval([d for d in deltas if not math.isnan(d)], level=level)
        runs_of_init = list(by_seed.values())
        seed_deltas = [by_seed[s].metrics.get("test/auc", math.nan) - baseline[s].metrics.get("test/auc", math.nan)
                       for s in seeds]  # fmt: skip
        rows.append(TransferEffectRow(
            model, size, init, estimates["auc"], estimates["auprc"], len(pairs[0][1].index) if stored else 0,
            source=runs_of_init[0].source, source_weak=any(r.source_weak for r in runs_of_init),
            seed_deltas=tuple(d for d in seed_deltas if not math.isnan(d)),
        ))  # fmt: skip
    return rows


def _points(value: float) -> str:
    return UNDEFINED if math.isnan(value) else f"{100 * value:+.1f}"


def _cell(estimate: TransferInterval) -> str:
    """``+2.1 [+0.4, +3.8]`` in points (x100); why not, where there is no number."""
    if estimate.undefined_labels:
        return f"{UNDEFINED} ({', '.join(estimate.undefined_labels)}: one class only)"
    if math.isnan(estimate.delta):
        return UNDEFINED
    if math.isnan(estimate.low):
        return f"{_points(estimate.delta)} [{UNDEFINED}]"
    text = f"{_points(estimate.delta)} [{_points(estimate.low)}, {_points(estimate.high)}]"
    return text + (" (test set only)" if estimate.seeds < 2 else "")


# Footnote marks for the sources of a table, in order of first appearance.
_MARKS = ("†", "‡", "§", "¶", "‖", "#")
NOT_AFTER_HOLM = "°"


def family_verdicts(rows: list[TransferEffectRow], *, alpha: float) -> tuple[list[str], int]:
    """The AUC verdict of each row, marked where it does not survive Holm across the table; the family size."""
    adjusted = holm_adjusted([r.auc.p_value if r.auc.verdict in (HELPS, HURTS, NO_DIFFERENCE) else math.nan
                              for r in rows])  # fmt: skip
    verdicts = []
    for r, p in zip(rows, adjusted, strict=True):
        verdict = r.auc.verdict
        if verdict in (HELPS, HURTS) and not p < alpha:
            verdict += NOT_AFTER_HOLM
        verdicts.append(verdict)
    return verdicts, sum(not math.isnan(p) for p in adjusted)


def _constant_or_range(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}–{high}"


def transfer_effect_markdown(
    rows: list[TransferEffectRow], *, paper_delta: Callable[[str, str, str], float | None] | None = None
) -> str:
    """The "Does transfer help?" table, AUC points (x100), its caption and its footnotes.

    ``paper_delta(model, init, size)`` adds the paper's ΔAUC (a column only when some row has one).
    What is the same in every row (the interval's meaning, test images, resampling unit,
    the Holm family) is said once in the caption; columns empty in every row are dropped.
    """
    level = rows[0].auc.level if rows else 0.95
    alpha = 1 - level
    verdicts, family = family_verdicts(rows, alpha=alpha)
    marks: dict[str, str] = {}
    for r in rows:
        if r.source and r.source not in marks:
            marks[r.source] = _MARKS[len(marks) % len(_MARKS)] * (1 + len(marks) // len(_MARKS))
    ci = f"[{level * 100:g} % CI]"
    columns: dict[str, list[str]] = {name: [] for name in (
        "model", "size", "init", "seeds", f"ΔAUC {ci}", f"ΔAUPRC {ci}", "verdict", "paper ΔAUC",
    )}  # fmt: skip
    for r, verdict in zip(rows, verdicts, strict=True):
        # A weak source stands for no ImageNet: the paper's ImageNet difference does not apply to it.
        paper = paper_delta(r.model, r.init, r.data_size) if paper_delta and not r.source_weak else None
        cells = (r.model, r.data_size, r.init + marks.get(r.source, ""), str(r.auc.seeds), _cell(r.auc),
                 _cell(r.auprc), verdict, "" if paper is None else f"{paper:+.1f}")  # fmt: skip
        for column, cell in zip(columns, cells, strict=True):
            columns[column].append(cell)
    seed_counts = [r.auc.seeds for r in rows]
    if len(set(seed_counts)) <= 1:
        del columns["seeds"]  # the same in every row: said in the caption
    for name in list(columns):
        if not any(columns[name]):
            del columns[name]
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in zip(*columns.values(), strict=True)]
    return "\n".join(lines) + "\n\n" + _caption(rows, family=family, level=level) + _footnotes(rows, marks) + "\n"


def _caption(rows: list[TransferEffectRow], *, family: int, level: float) -> str:
    if not rows:
        return ""
    stored = [r for r in rows if r.test_images]
    seeds = _constant_or_range([r.auc.seeds for r in rows])
    parts = [
        f"Δ = init − random, in AUC/AUPRC points (×100), mean over {seeds} paired seeds; the {level * 100:g} % CI is "
        "for the expected difference over training randomness and the test population"
    ]
    if stored:
        units = sorted({r.auc.resampled_by for r in stored})
        by = " or ".join(units) if len(units) > 1 else units[0]
        parts.append(f"{_constant_or_range([r.test_images for r in stored])} test images, resampled by {by}"
                     " (AUC: DeLong influence values; AUPRC: bootstrap)")  # fmt: skip
    if len(stored) < len(rows):
        parts.append(f"{len(rows) - len(stored)} row(s) without stored test predictions: seed spread only")
    if any(r.auc.seeds < 2 for r in rows):
        parts.append(f"one seed: test-set noise only and the verdict is *{TOO_FEW_SEEDS}*")
    parts.append(
        f"verdict (ΔAUC) *{HELPS}*/*{HURTS}* when the CI excludes 0, else *{NO_DIFFERENCE}*; Holm family: the "
        f"{family} verdict(s) of this table, {NOT_AFTER_HOLM} = not significant after a Holm correction "
        f"(α = {1 - level:.2f})"
    )
    return "; ".join(parts) + "."


def _footnotes(rows: list[TransferEffectRow], marks: dict[str, str]) -> str:
    weak = {r.source for r in rows if r.source_weak}
    lines = [
        f"{mark} {'**weak** source: ' if source in weak else 'source: '}{source}" for source, mark in marks.items()
    ]
    return "".join("\n\n" + line for line in lines)


# The init labels of a transfer: the source is in the name (synthetic) or after "@".
_TRANSFER_NAMES = {"imagenet": "imagenet", "synthetic-transfer": "synthetic", "transfer": ""}


def transfer_source(init_label: str) -> str | None:
    """The source a plain transfer init copied (``transfer@dino-resnet50`` -> ``dino-resnet50``);
    None for any other init (Mean-Var, transfusion(k), Gabor)."""
    base = init_label.split("@", 1)[0]
    if base not in _TRANSFER_NAMES:
        return None
    return source_of(init_label) or _TRANSFER_NAMES[base] or "transfer"


def _overlaps(a: TransferInterval, b: TransferInterval) -> bool:
    return not (math.isnan(a.ci_low) or math.isnan(b.ci_low)) and a.ci_low <= b.ci_high and b.ci_low <= a.ci_high


def which_source_markdown(rows: list[TransferEffectRow]) -> str:
    """Per (model, data size) over two or more sources: each source's transfer ΔAUC, best first.

    The top source is called best only when its CI clears every other's; otherwise the
    table says which sources it cannot be told from. Empty when no cell has two sources.
    """
    cells: dict[tuple[str, str], list[tuple[str, TransferEffectRow]]] = defaultdict(list)
    for r in rows:
        source = transfer_source(r.init)
        if source is not None:
            cells[(r.model, r.data_size)].append((source, r))
    lines = []
    for (model, size), entries in cells.items():
        if len(entries) < 2:
            continue
        ranked = sorted(entries, key=lambda e: -e[1].auc.delta if not math.isnan(e[1].auc.delta) else math.inf)
        top = ranked[0][1].auc
        ties = [source for source, r in ranked[1:] if _overlaps(top, r.auc) or math.isnan(r.auc.ci_low)]
        for rank, (source, r) in enumerate(ranked, start=1):
            weak = " (**weak source**)" if r.source_weak else ""
            if rank == 1:
                standing = (
                    f"cannot be told from {', '.join(ties)}" if ties else "best: its CI clears every other source's"
                )
            else:
                standing = UNDEFINED
            lines.append(
                f"| {model} | {size} | {rank} | {source}{weak} | {r.auc.seeds} | {_cell(r.auc)} "
                f"| {r.auc.verdict} | {standing} |"
            )
    if not lines:
        return ""
    header = [
        "| model | data size | rank | source | seeds | ΔAUC vs random [95 % CI] | verdict | standing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    note = (
        "\nSources ranked by the mean ΔAUC of plain transfer against random init (AUC points ×100). "
        "Overlapping 95% CIs mean the ranking is not resolved by this grid's seeds and test images.\n"
    )
    return "\n".join(header + lines) + "\n" + note


_METRIC_KEY = re.compile(r"[^\w.\-/ :]")
VERDICT_CODES = {HELPS: 1.0, NO_DIFFERENCE: 0.0, HURTS: -1.0}  # too few seeds / undefined: absent


def transfer_effect_metrics(rows: list[TransferEffectRow]) -> dict[str, float]:
    """Flat metrics for the grid's parent run: ``transfer/<model>/<size>/<init>/delta_auc`` etc.

    The verdict is ``.../verdict_auc``: 1 helps, 0 no detectable difference, -1 hurts (absent for
    too few seeds or undefined); ``p_auc`` is the unadjusted p-value and ``holm_p_auc`` its Holm
    adjustment across the rows passed (one family, as in the table).
    """
    holm = {metric: holm_adjusted([getattr(r, metric).p_value for r in rows]) for metric in METRICS}
    metrics: dict[str, float] = {}
    for i, r in enumerate(rows):
        prefix = "transfer/" + "/".join(_METRIC_KEY.sub("_", part) for part in (r.model, r.data_size, r.init))
        for metric, estimate in (("auc", r.auc), ("auprc", r.auprc)):
            values = {
                f"delta_{metric}": estimate.delta,
                f"delta_{metric}_ci_low": estimate.ci_low,
                f"delta_{metric}_ci_high": estimate.ci_high,
                f"verdict_{metric}": VERDICT_CODES.get(estimate.verdict, math.nan),
                f"p_{metric}": estimate.p_value,
                f"holm_p_{metric}": holm[metric][i],
            }
            metrics.update({f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)})
        metrics[f"{prefix}/seeds"] = float(r.auc.seeds)
    return metrics
