"""Per-label and macro AUC / AUPRC for binary and multi-label targets.

Test predictions are stored per run (:func:`save_test_predictions`) so that two runs
scored on the same images can be compared pairwise later.

Targets are ``(N, L)`` in {0, 1} with NaN for ignored entries (CheXpert U-Ignore); a
label whose non-ignored targets hold a single class has no AUC and is left out of
the macro average rather than reported as 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


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

    def as_metrics(self, prefix: str) -> dict[str, float]:
        metrics = {f"{prefix}/auc": self.auc, f"{prefix}/auprc": self.auprc}
        if len(self.per_label_auc) > 1:
            for label, value in self.per_label_auc.items():
                metrics[f"{prefix}/auc/{label}"] = value
            for label, value in self.per_label_auprc.items():
                metrics[f"{prefix}/auprc/{label}"] = value
        return metrics


def classification_scores(scores: np.ndarray, targets: np.ndarray, label_names: list[str]) -> ClassificationScores:
    """AUC and AUPRC per label (columns) and their macro means."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    aucs: dict[str, float] = {}
    auprcs: dict[str, float] = {}
    for j, label in enumerate(label_names):
        keep = ~np.isnan(targets[:, j])
        y, s = targets[keep, j], scores[keep, j]
        if len(np.unique(y)) < 2 or not np.all(np.isfinite(s)):
            continue
        aucs[label] = roc_auc(y, s)
        auprcs[label] = average_precision(y, s)
    macro_auc = float(np.mean(list(aucs.values()))) if aucs else float("nan")
    macro_auprc = float(np.mean(list(auprcs.values()))) if auprcs else float("nan")
    return ClassificationScores(macro_auc, macro_auprc, aucs, auprcs)


@dataclass(frozen=True)
class RunPredictions:
    """One run's scores on the test split: ``index`` (N,) dataset rows, ``scores`` and ``targets`` (N, L)."""

    index: np.ndarray
    scores: np.ndarray
    targets: np.ndarray

    @classmethod
    def load(cls, path: Path) -> RunPredictions:
        with np.load(path) as data:
            return cls(
                index=data["index"],
                scores=data["scores"].astype(np.float64).reshape(len(data["index"]), -1),
                targets=data["targets"].astype(np.float64).reshape(len(data["index"]), -1),
            )

    def same_images(self, other: RunPredictions) -> bool:
        return bool(
            self.index.shape == other.index.shape
            and np.array_equal(self.index, other.index)
            and np.array_equal(self.targets, other.targets, equal_nan=True)
        )


def save_test_predictions(path: Path, *, index: np.ndarray, scores: np.ndarray, targets: np.ndarray) -> Path:
    """Writes a run's test predictions: fp32 scores, fp16 targets (0, 1 and NaN are exact), int64 rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        index=np.asarray(index, dtype=np.int64),
        scores=np.asarray(scores, dtype=np.float32),
        targets=np.asarray(targets, dtype=np.float16),
    )
    return path
