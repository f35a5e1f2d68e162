"""Does transfer help? ΔAUC and ΔAUPRC of each init against ``random``, with a 95 % CI and a verdict.

Per (model, data size), each non-random init is paired with ``random`` seed by seed:
both runs of a seed trained on the same subset and scored the same test images, so
``Δ_s = metric(init_s) - metric(random_s)`` is a paired difference. Two sources of
uncertainty enter the mean ``Δ`` over the k paired seeds:

- test-set sampling: a paired bootstrap over the shared test images (the same resampled
  images score both runs) gives ``var_boot(Δ_s)``. Every seed is scored on the same test
  set, so this error does not shrink with k: its mean over seeds enters whole;
- training noise: the sample variance of ``Δ_s`` over seeds, divided by k.

``SE² = mean_s var_boot(Δ_s) + var_s(Δ_s) / k`` and the CI is ``Δ ± t · SE`` with
Welch-Satterthwaite degrees of freedom (the bootstrap term counts as known exactly). A
CI that excludes 0 gives the verdict *helps* or *hurts*; else *no detectable
difference*. With one seed the CI covers test-set sampling only, and says so; without
stored test predictions it covers the seed spread only, and is undefined for one seed.

Scores are ``(N, L)`` arrays of examples x labels, targets the same shape in {0, 1}
with NaN for ignored entries; metrics are macro means over labels, as in
:mod:`transfusion.metrics`. Bootstrap replicates are count weights on the examples,
so each replicate costs one pass over scores sorted once.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.analysis.formatting import UNDEFINED
from transfusion.analysis.records import JobRecord, source_of
from transfusion.metrics import RunPredictions

RANDOM_INIT = "random"
HELPS, HURTS, NO_DIFFERENCE = "helps", "hurts", "no detectable difference"
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


def macro_metric(predictions: RunPredictions, weights: np.ndarray, metric: str) -> np.ndarray:
    """Macro mean over labels with both classes of ``metric`` per weight row (B, N) -> (B,)."""
    function = {"auc": weighted_auc, "auprc": weighted_average_precision}[metric]
    per_label = []
    for j in range(predictions.targets.shape[1]):
        keep = ~np.isnan(predictions.targets[:, j])
        y = predictions.targets[keep, j]
        if len(np.unique(y)) < 2:
            continue
        per_label.append(function(y, predictions.scores[keep, j], weights[:, keep]))
    if not per_label:
        return np.full(len(weights), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate with no defined label is NaN, not an error
        return np.nanmean(np.stack(per_label), axis=0)


@dataclass(frozen=True)
class PairedDifference:
    """``metric(a) - metric(b)`` on the full test set and its paired-bootstrap variance."""

    delta: float
    bootstrap_variance: float
    replicates: int


def bootstrap_counts(n: int, *, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, n) counts of each example in a resample of n with replacement."""
    draws = rng.integers(0, n, size=(replicates, n)) + n * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


# Bootstrap work per paired difference, in (example x label)-replicates: 1 000 replicates up
# to 20 000 test scores, fewer (never under 200) above, so a 50 000-image test set costs
# seconds per pair.
BOOTSTRAP_BUDGET = 20_000_000
MIN_REPLICATES = 200


def replicates_for(n: int, requested: int) -> int:
    return max(min(requested, MIN_REPLICATES), min(requested, BOOTSTRAP_BUDGET // max(1, n)))


def paired_bootstrap_difference(
    a: RunPredictions, b: RunPredictions, *, metric: str, replicates: int = 1000, seed: int = 0, chunk: int = 100
) -> PairedDifference:
    """Δ = metric(a) - metric(b) over the same test images, with its paired-bootstrap variance.

    ``replicates`` is lowered for large test sets (see :data:`BOOTSTRAP_BUDGET`); the
    result says how many were used.
    """
    if not a.same_images(b):
        raise ValueError("paired bootstrap needs both runs scored on the same test images (index and targets differ)")
    n = len(a.index)
    replicates = replicates_for(n * a.scores.shape[1], replicates)  # each label is one more pass
    ones = np.ones((1, n))
    delta = float(macro_metric(a, ones, metric)[0] - macro_metric(b, ones, metric)[0])
    rng = np.random.default_rng(seed)
    deltas = []
    for start in range(0, replicates, chunk):
        weights = bootstrap_counts(n, replicates=min(chunk, replicates - start), rng=rng)
        deltas.append(macro_metric(a, weights, metric) - macro_metric(b, weights, metric))
    values = np.concatenate(deltas)
    values = values[np.isfinite(values)]
    variance = float(np.var(values, ddof=1)) if len(values) > 1 else math.nan
    return PairedDifference(delta, variance, len(values))


@dataclass(frozen=True)
class EffectEstimate:
    """Mean paired difference over seeds with its 95 % CI (NaN bounds: undefined)."""

    delta: float
    ci_low: float
    ci_high: float
    seeds: int
    basis: str  # what the CI covers, in words

    @property
    def verdict(self) -> str:
        if math.isnan(self.ci_low) or math.isnan(self.ci_high):
            return UNDEFINED
        if self.ci_low > 0:
            return HELPS
        if self.ci_high < 0:
            return HURTS
        return NO_DIFFERENCE


def t_quantile_975(df: float) -> float:
    """Two-sided 95 % Student t quantile; the normal's 1.96 for infinite df."""
    if math.isinf(df):
        return 1.959963984540054
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def combine_seeds(deltas: list[float], bootstrap_variances: list[float] | None) -> EffectEstimate:
    """The mean of per-seed paired differences with a CI from test-set sampling and seed spread.

    ``bootstrap_variances`` (one per seed) is None when no test predictions were stored.
    """
    k = len(deltas)
    if k == 0:
        return EffectEstimate(math.nan, math.nan, math.nan, 0, "no paired seeds")
    mean = float(np.mean(deltas))
    seed_term = float(np.var(deltas, ddof=1)) / k if k > 1 else math.nan
    test_term = float(np.mean(bootstrap_variances)) if bootstrap_variances else math.nan
    if bootstrap_variances and k > 1:
        se2, basis = test_term + seed_term, f"{k} seeds + paired bootstrap over test images"
        # Welch-Satterthwaite: only the seed term is estimated from few values.
        df = se2**2 / (seed_term**2 / (k - 1)) if seed_term > 0 else math.inf
    elif bootstrap_variances:
        se2, df, basis = test_term, math.inf, "1 seed: test-image bootstrap only, training noise not covered"
    elif k > 1:
        se2, df, basis = seed_term, k - 1, f"{k} seeds, seed spread only (no test predictions stored)"
    else:
        return EffectEstimate(mean, math.nan, math.nan, k, "1 seed, no test predictions: CI undefined")
    if math.isnan(se2):
        return EffectEstimate(mean, math.nan, math.nan, k, basis)
    half = t_quantile_975(df) * math.sqrt(se2)
    return EffectEstimate(mean, mean - half, mean + half, k, basis)


@dataclass(frozen=True)
class TransferEffectRow:
    """One init against ``random`` for one (model, data size)."""

    model: str
    data_size: str
    init: str
    auc: EffectEstimate
    auprc: EffectEstimate
    test_images: int = 0
    source: str = ""
    source_weak: bool = False


def _load_predictions(record: JobRecord) -> RunPredictions | None:
    if record.predictions is None or not Path(record.predictions).is_file():
        return None
    return RunPredictions.load(Path(record.predictions))


def transfer_effect_table(records: list[JobRecord], *, replicates: int = 1000) -> list[TransferEffectRow]:
    """Every non-random init against ``random`` per (model, data size), seeds paired by number."""
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
        estimates = {}
        images = 0
        for metric in METRICS:
            pairs = [(predictions(by_seed[s]), predictions(baseline[s])) for s in seeds]
            if seeds and all(a is not None and b is not None and a.same_images(b) for a, b in pairs):
                differences = [
                    paired_bootstrap_difference(a, b, metric=metric, replicates=replicates, seed=s)
                    for (a, b), s in zip(pairs, seeds, strict=True)
                ]
                deltas = [d.delta for d in differences]
                variances = [d.bootstrap_variance for d in differences]
                images = len(pairs[0][0].index)
            else:
                key = f"test/{metric}"
                deltas = [by_seed[s].metrics.get(key, math.nan) - baseline[s].metrics.get(key, math.nan) for s in seeds]
                deltas = [d for d in deltas if not math.isnan(d)]
                variances = None
            estimates[metric] = combine_seeds(deltas, variances)
        runs_of_init = list(by_seed.values())
        rows.append(TransferEffectRow(
            model, size, init, estimates["auc"], estimates["auprc"], images,
            source=runs_of_init[0].source, source_weak=any(r.source_weak for r in runs_of_init),
        ))  # fmt: skip
    return rows


def _points(value: float) -> str:
    return UNDEFINED if math.isnan(value) else f"{100 * value:+.1f}"


def _interval(estimate: EffectEstimate) -> str:
    if math.isnan(estimate.ci_low):
        return UNDEFINED
    return f"[{100 * estimate.ci_low:+.1f}, {100 * estimate.ci_high:+.1f}]"


def transfer_effect_markdown(rows: list[TransferEffectRow], *, paper_delta=None) -> str:
    """The "Does transfer help?" table, AUC points (x100); ``paper_delta(model, init, size)`` adds the paper's Δ."""
    lines = [
        "| model | data size | init vs random | seeds | ΔAUC | 95% CI | verdict | ΔAUPRC | ΔAUPRC 95% CI "
        "| AUPRC verdict | paper ΔAUC | CI covers | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        # A weak source stands for no ImageNet: the paper's ImageNet difference does not apply to it.
        paper = paper_delta(r.model, r.init, r.data_size) if paper_delta and not r.source_weak else None
        covers = r.auc.basis + (f"; {r.test_images} test images" if r.test_images else "")
        source = (f"**weak**: {r.source}" if r.source_weak else r.source) or UNDEFINED
        init = f"{r.init} (weak source)" if r.source_weak else r.init
        lines.append(
            f"| {r.model} | {r.data_size} | {init} | {r.auc.seeds} | {_points(r.auc.delta)} | {_interval(r.auc)} "
            f"| {r.auc.verdict} | {_points(r.auprc.delta)} | {_interval(r.auprc)} | {r.auprc.verdict} "
            f"| {UNDEFINED if paper is None else f'{paper:+.1f}'} | {covers} | {source} |"
        )
    note = (
        "\nΔ = init − random in AUC points (×100), mean over paired seeds. 95% CI from a paired bootstrap over the "
        "shared test images within each seed combined with the spread across seeds; the verdict is "
        f"*{HELPS}* or *{HURTS}* when the CI excludes 0, else *{NO_DIFFERENCE}*.\n"
    )
    return "\n".join(lines) + "\n" + note


# The init labels of a transfer: the source is in the name (synthetic) or after "@".
_TRANSFER_NAMES = {"imagenet": "imagenet", "synthetic-transfer": "synthetic", "transfer": ""}


def transfer_source(init_label: str) -> str | None:
    """The source a plain transfer init copied (``transfer@dino-resnet50`` -> ``dino-resnet50``);
    None for any other init (Mean-Var, transfusion(k), Gabor)."""
    base = init_label.split("@", 1)[0]
    if base not in _TRANSFER_NAMES:
        return None
    return source_of(init_label) or _TRANSFER_NAMES[base] or "transfer"


def _overlaps(a: EffectEstimate, b: EffectEstimate) -> bool:
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
                f"| {model} | {size} | {rank} | {source}{weak} | {r.auc.seeds} | {_points(r.auc.delta)} "
                f"| {_interval(r.auc)} | {r.auc.verdict} | {standing} |"
            )
    if not lines:
        return ""
    header = [
        "| model | data size | rank | source | seeds | ΔAUC vs random | 95% CI | verdict | standing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    note = (
        "\nSources ranked by the mean ΔAUC of plain transfer against random init (AUC points ×100). "
        "Overlapping 95% CIs mean the ranking is not resolved by this grid's seeds and test images.\n"
    )
    return "\n".join(header + lines) + "\n" + note


_METRIC_KEY = re.compile(r"[^\w.\-/ :]")
VERDICT_CODES = {HELPS: 1.0, NO_DIFFERENCE: 0.0, HURTS: -1.0}


def transfer_effect_metrics(rows: list[TransferEffectRow]) -> dict[str, float]:
    """Flat metrics for the grid's parent run: ``transfer/<model>/<size>/<init>/delta_auc`` etc.

    The verdict is ``.../verdict_auc``: 1 helps, 0 no detectable difference, -1 hurts (absent if undefined).
    """
    metrics: dict[str, float] = {}
    for r in rows:
        prefix = "transfer/" + "/".join(_METRIC_KEY.sub("_", part) for part in (r.model, r.data_size, r.init))
        for metric, estimate in (("auc", r.auc), ("auprc", r.auprc)):
            values = {
                f"delta_{metric}": estimate.delta,
                f"delta_{metric}_ci_low": estimate.ci_low,
                f"delta_{metric}_ci_high": estimate.ci_high,
                f"verdict_{metric}": VERDICT_CODES.get(estimate.verdict, math.nan),
            }
            metrics.update({f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)})
        metrics[f"{prefix}/seeds"] = float(r.auc.seeds)
    return metrics
