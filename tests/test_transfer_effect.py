"""Does transfer help? The paired statistics on toy scorers of known quality, and the tables that print them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from transfusion.analysis.convergence import ConvergenceSettings, convergence_markdown, convergence_table
from transfusion.analysis.records import JobRecord
from transfusion.analysis.report import analyze_records, write_report
from transfusion.analysis.tables import results_table, to_markdown
from transfusion.analysis.transfer_effect import (
    HELPS,
    HURTS,
    NO_DIFFERENCE,
    combine_seeds,
    paired_bootstrap_difference,
    transfer_effect_markdown,
    transfer_effect_metrics,
    transfer_effect_table,
    weighted_auc,
    weighted_average_precision,
)
from transfusion.metrics import RunPredictions, classification_scores, save_test_predictions

N_TEST = 300


def _targets(rng: np.random.Generator, labels: int = 1) -> np.ndarray:
    return (rng.random((N_TEST, labels)) < 0.35).astype(np.float64)


def test_weighted_metrics_equal_scikit_learn_on_the_resampled_set():
    rng = np.random.default_rng(0)
    y = _targets(rng)[:, 0]
    scores = np.round(y + rng.normal(size=N_TEST), 1)  # rounded: many ties
    ones = np.ones((1, N_TEST))
    assert weighted_auc(y, scores, ones)[0] == pytest.approx(roc_auc_score(y, scores))
    assert weighted_average_precision(y, scores, ones)[0] == pytest.approx(average_precision_score(y, scores))
    for _ in range(3):
        index = rng.integers(0, N_TEST, N_TEST)
        counts = np.bincount(index, minlength=N_TEST)[None].astype(float)
        assert weighted_auc(y, scores, counts)[0] == pytest.approx(roc_auc_score(y[index], scores[index]))
        assert weighted_average_precision(y, scores, counts)[0] == pytest.approx(
            average_precision_score(y[index], scores[index])
        )


def test_paired_bootstrap_delta_matches_the_metric_difference_and_is_zero_for_one_scorer():
    rng = np.random.default_rng(1)
    y = _targets(rng, labels=2)
    y[:20, 1] = np.nan  # ignored entries (U-Ignore) stay out of that label
    index = np.arange(N_TEST)
    good = RunPredictions(index, y + 0.7 * rng.normal(size=y.shape), y)
    bad = RunPredictions(index, y + 2.0 * rng.normal(size=y.shape), y)
    names = ["a", "b"]
    expected = classification_scores(good.scores, y, names).auc - classification_scores(bad.scores, y, names).auc
    difference = paired_bootstrap_difference(good, bad, metric="auc", replicates=200)
    assert difference.delta == pytest.approx(expected)
    assert difference.replicates == 200 and difference.bootstrap_variance > 0
    same = paired_bootstrap_difference(good, good, metric="auprc", replicates=50)
    assert same.delta == 0 and same.bootstrap_variance == 0
    other = RunPredictions(index[::-1].copy(), good.scores, y)
    with pytest.raises(ValueError, match="same test images"):
        paired_bootstrap_difference(good, other, metric="auc")


def test_combined_interval_adds_seed_spread_to_test_sampling():
    # Two seeds, no test-set noise: mean 0.02, SE 0.01 on 1 df -> t(0.975, 1) = 12.706.
    estimate = combine_seeds([0.01, 0.03], [0.0, 0.0])
    assert estimate.delta == pytest.approx(0.02)
    assert estimate.ci_high - estimate.delta == pytest.approx(12.7062 * 0.01, rel=1e-4)
    # Identical seeds: the test-set term alone, normal quantile.
    estimate = combine_seeds([0.05, 0.05, 0.05], [1e-4] * 3)
    assert estimate.ci_low == pytest.approx(0.05 - 1.96 * 0.01, rel=1e-3) and estimate.verdict == HELPS
    one = combine_seeds([0.05], [1e-4])
    assert one.verdict == HELPS and "1 seed" in one.basis and "training noise not covered" in one.basis
    undefined = combine_seeds([0.05], None)
    assert math.isnan(undefined.ci_low) and undefined.verdict == "–"


def _grid_records(tmp_path, *, seeds=(0, 1, 2), with_predictions=True) -> list[JobRecord]:
    """random and a transfer init that is a deliberately better scorer; a copy of random that is identical."""
    rng = np.random.default_rng(7)
    y = _targets(rng)
    index = np.arange(1000, 1000 + N_TEST)
    records = []
    for seed in seeds:
        noise = np.random.default_rng(100 + seed).normal(size=y.shape)
        scorers = {
            "random": y + 1.6 * noise,
            "synthetic-transfer": y + 0.6 * np.random.default_rng(200 + seed).normal(size=y.shape),
            "mean-var": y + 1.6 * noise,  # identical to random, seed for seed
            "gabor": np.random.default_rng(300 + seed).normal(size=y.shape),  # chance: no signal at all
        }
        for init, scores in scorers.items():
            path = save_test_predictions(tmp_path / f"{init}-{seed}.npz", index=index, scores=scores, targets=y)
            metrics = classification_scores(scores, y, ["referable"]).as_metrics("test")
            records.append(JobRecord(
                job_key=f"{init}{seed}", run_id=f"{init}-{seed}", model="cbr-tiny", init=init, data_size="full",
                seed=seed, status="FINISHED", metrics=metrics, predictions=path if with_predictions else None,
            ))  # fmt: skip
    return records


def test_better_scorer_helps_identical_scorer_shows_no_difference_worse_hurts(tmp_path):
    rows = {r.init: r for r in transfer_effect_table(_grid_records(tmp_path), replicates=300)}
    assert set(rows) == {"synthetic-transfer", "mean-var", "gabor"}
    assert rows["synthetic-transfer"].auc.verdict == HELPS and rows["synthetic-transfer"].auc.delta > 0.05
    assert rows["synthetic-transfer"].auprc.verdict == HELPS
    assert rows["mean-var"].auc.verdict == NO_DIFFERENCE and rows["mean-var"].auc.delta == 0
    assert rows["gabor"].auc.verdict == HURTS
    assert rows["synthetic-transfer"].auc.seeds == 3 and rows["synthetic-transfer"].test_images == N_TEST
    assert "paired bootstrap" in rows["synthetic-transfer"].auc.basis

    text = transfer_effect_markdown(list(rows.values()))
    header = text.splitlines()[0]
    for column in ("ΔAUC", "95% CI", "verdict", "ΔAUPRC"):
        assert f"| {column} |" in header
    assert "| helps |" in text and "| no detectable difference |" in text and "| hurts |" in text

    metrics = transfer_effect_metrics(list(rows.values()))
    assert metrics["transfer/cbr-tiny/full/synthetic-transfer/verdict_auc"] == 1.0
    assert metrics["transfer/cbr-tiny/full/gabor/verdict_auc"] == -1.0
    assert metrics["transfer/cbr-tiny/full/mean-var/delta_auc"] == 0.0


def test_without_predictions_one_seed_has_no_interval_and_no_verdict(tmp_path):
    rows = transfer_effect_table(_grid_records(tmp_path, seeds=(0,), with_predictions=False))
    for row in rows:
        assert math.isnan(row.auc.ci_low) and row.auc.verdict == "–"
    line = next(line for line in transfer_effect_markdown(rows).splitlines() if "synthetic-transfer" in line)
    assert "| – | – |" in line and "no test predictions" in line
    metrics = transfer_effect_metrics(rows)
    assert "transfer/cbr-tiny/full/gabor/delta_auc" in metrics
    assert not any(key.endswith("verdict_auc") for key in metrics)


def test_report_opens_with_does_transfer_help(tmp_path):
    records = _grid_records(tmp_path / "runs")
    outputs = analyze_records(records, tmp_path / "report", grid_name="toy", dataset="synthetic-retina")
    md, html = write_report(outputs, title="toy")
    text = md.read_text()
    assert text.index("## Does transfer help?") < text.index("## Tables 1–3")
    assert "| cbr-tiny | full | synthetic-transfer | 3 |" in text and "| helps |" in text
    assert "<th>ΔAUC</th><th>95% CI</th><th>verdict</th>" in html.read_text()
    assert (tmp_path / "report" / "transfer_effect.md").read_text().startswith("### Does transfer help?")


def test_undefined_spread_prints_a_dash_never_zero():
    one_seed = JobRecord("a", "a", "m", "random", "full", 0, "FINISHED", metrics={"test/auc": 0.9, "test/auprc": 0.8},
                         val_curve=((0, 0.5), (10, 0.95)))  # fmt: skip
    rows = results_table([one_seed])
    assert math.isnan(rows[0].auc_std)
    table = to_markdown(rows)
    assert "90.0 ± –" in table and "± 0.0" not in table
    conv = convergence_markdown(convergence_table([one_seed], ConvergenceSettings()))
    assert "| 9 | 1/1 reached | s0: 9 |" in conv and "± 0" not in conv  # median of one seed: no spread
