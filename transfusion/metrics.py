"""Per-label and macro AUC / AUPRC for binary and multi-label targets.

Test predictions are stored per run (:func:`save_test_predictions`) so that two runs
scored on the same images can be compared pairwise later.

Targets are ``(N, L)`` in {0, 1} with NaN for ignored entries (CheXpert U-Ignore); a
label whose non-ignored targets hold a single class has no AUC: the macro is then NaN
and the label is named in ``undefined_labels`` (and logged), because the mean of the
other labels would silently be a different metric. Scores are logits (any strictly
monotone score): a float32 sigmoid saturates to exactly 1.0 and ties the best images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic with average ranks for ties.

    Written here rather than imported from scikit-learn, whose import costs every
    training worker about a second; tests check it against scikit-learn.
    """
    targets = np.asarray(targets, dtype=bool)
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each tie group
    ranks = np.empty(len(scores))
    ranks[order] = average_rank[inverse]
    positives = targets.sum()
    negatives = len(targets) - positives
    return float((ranks[targets].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, sum over thresholds of (R_n - R_{n-1}) P_n, as scikit-learn defines it."""
    order = np.argsort(-scores, kind="mergesort")
    hits, ranked = np.asarray(targets, dtype=float)[order], scores[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    true_positives = np.cumsum(hits)[last_of_threshold]
    precision = true_positives / (last_of_threshold + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass(frozen=True)
class ClassificationScores:
    auc: float
    auprc: float
    per_label_auc: dict[str, float]
    per_label_auprc: dict[str, float]
    undefined_labels: tuple[str, ...] = ()  # one class only (or non-finite scores): no AUC, so the macro is NaN

    def as_metrics(self, prefix: str) -> dict[str, float]:
        metrics = {f"{prefix}/auc": self.auc, f"{prefix}/auprc": self.auprc}
        if len(self.per_label_auc) > 1:
            for label, value in self.per_label_auc.items():
                metrics[f"{prefix}/auc/{label}"] = value
            for label, value in self.per_label_auprc.items():
                metrics[f"{prefix}/auprc/{label}"] = value
        return metrics


def classification_scores(
    scores: np.ndarray, targets: np.ndarray, label_names: list[str], *, macro_over_defined: bool = False
) -> ClassificationScores:
    """AUC and AUPRC per label (columns) and their macro means.

    A label with one class (or non-finite scores) makes the macro NaN, named in
    ``undefined_labels``; ``macro_over_defined`` averages the defined labels instead, for a
    many-class source whose validation split cannot hold every class (and says so in the log).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    aucs: dict[str, float] = {}
    auprcs: dict[str, float] = {}
    undefined = []
    for j, label in enumerate(label_names):
        keep = ~np.isnan(targets[:, j])
        y, s = targets[keep, j], scores[keep, j]
        if len(np.unique(y)) < 2 or not np.all(np.isfinite(s)):
            undefined.append(label)
            continue
        aucs[label] = roc_auc(y, s)
        auprcs[label] = average_precision(y, s)
    if undefined:
        log.log(
            logging.DEBUG if macro_over_defined else logging.WARNING,
            "AUC undefined for %d label(s) (one class only or non-finite scores): %s; macro %s",
            len(undefined), ", ".join(undefined[:10]), "over the other labels" if macro_over_defined else "is NaN",
        )  # fmt: skip
    if aucs and (macro_over_defined or not undefined):
        macro_auc, macro_auprc = float(np.mean(list(aucs.values()))), float(np.mean(list(auprcs.values())))
    else:
        macro_auc = macro_auprc = float("nan")
    return ClassificationScores(macro_auc, macro_auprc, aucs, auprcs, tuple(undefined))


@dataclass(frozen=True)
class RunPredictions:
    """One run's scores on the test split: ``index`` (N,) dataset rows, ``scores`` and ``targets`` (N, L).

    ``groups`` (N,) is each test image's patient as an integer code (None where the dataset
    has no patients, or the file predates them): images of one patient are resampled together.
    ``scores`` are logits in files written since they replaced float32 sigmoids (older files:
    probabilities, with ties where the sigmoid saturated).
    """

    index: np.ndarray
    scores: np.ndarray
    targets: np.ndarray
    groups: np.ndarray | None = None
    label_names: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> RunPredictions:
        with np.load(path) as data:
            return cls(
                index=data["index"],
                scores=data["scores"].astype(np.float64).reshape(len(data["index"]), -1),
                targets=data["targets"].astype(np.float64).reshape(len(data["index"]), -1),
                groups=data["groups"] if "groups" in data.files else None,
                label_names=tuple(str(n) for n in data["label_names"]) if "label_names" in data.files else (),
            )

    def same_images(self, other: RunPredictions) -> bool:
        return bool(
            self.index.shape == other.index.shape
            and np.array_equal(self.index, other.index)
            and np.array_equal(self.targets, other.targets, equal_nan=True)
        )


def save_test_predictions(
    path: Path,
    *,
    index: np.ndarray,
    scores: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray | None = None,
    label_names: list[str] | None = None,
) -> Path:
    """Writes a run's test predictions: fp32 logits, fp16 targets (0, 1 and NaN are exact), int64 rows.

    ``groups`` (the test images' patient ids, any type) is stored as int64 codes (rank of the sorted id), so
    every run of a grid writes the same codes for the same test split.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "index": np.asarray(index, dtype=np.int64),
        "scores": np.asarray(scores, dtype=np.float32),
        "targets": np.asarray(targets, dtype=np.float16),
    }
    if groups is not None:
        arrays["groups"] = np.unique(np.asarray(groups), return_inverse=True)[1].ravel().astype(np.int64)
    if label_names is not None:
        arrays["label_names"] = np.asarray(label_names, dtype=str)
    np.savez_compressed(path, **arrays)
    return path
