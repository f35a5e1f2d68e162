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
    TOO_FEW_SEEDS,
    TransferEffectRow,
    TransferInterval,
    holm_adjusted,
    transfer_effect_markdown,
    transfer_effect_metrics,
    transfer_effect_table,
    transfer_interval,
    weighted_auc,
    weighted_average_precision,
)
from transfusion.metrics import classification_scores, save_test_predictions

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


def test_interval_delta_is_the_macro_difference_with_unlabelled_entries_left_out():
    rng = np.random.default_rng(1)
    y = _targets(rng, labels=2)
    y[:20, 1] = np.nan  # ignored entries (U-Ignore) stay out of that label
    good = np.nan_to_num(y) + 0.7 * rng.normal(size=(2, *y.shape))
    bad = np.nan_to_num(y) + 2.0 * rng.normal(size=(2, *y.shape))
    names = ["a", "b"]
    aucs = [
        (classification_scores(g, y, names).auc, classification_scores(b, y, names).auc)
        for g, b in zip(good, bad, strict=True)
    ]
    expected = np.mean([a - b for a, b in aucs])
    estimate = transfer_interval(y, good, bad)
    assert estimate.delta == pytest.approx(expected) and estimate.seeds == 2 and estimate.se > 0
    same = transfer_interval(y, good, good, metric="auprc", replicates=50)
    assert same.delta == 0 and same.se == 0 and same.verdict == NO_DIFFERENCE


def test_holm_marks_verdicts_that_do_not_survive_across_the_table():
    assert holm_adjusted([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)

    def row(init: str, p: float) -> TransferEffectRow:
        estimate = TransferInterval(0.02, 0.001, 0.04, 3, "3 paired seeds", se=0.01, df=2, p_value=p)
        return TransferEffectRow("cbr-tiny", "full", init, estimate, estimate, test_images=N_TEST)

    text = transfer_effect_markdown([row("imagenet", 0.01), row("mean-var", 0.04), row("gabor", 0.03)])
    lines = {line.split("|")[3].strip(): line for line in text.splitlines() if line.startswith("| cbr-tiny")}
    assert lines["imagenet"].endswith(f"| {HELPS} |") and lines["mean-var"].endswith(f"| {HELPS}° |")
    assert "Holm family: the 3 verdict(s) of this table" in text


def _grid_records(tmp_path, *, seeds=(0, 1, 2), with_predictions=True, patients=None) -> list[JobRecord]:
    """random and a transfer init that is a deliberately better scorer; a copy of random that is identical."""
    rng = np.random.default_rng(7)
    y = _targets(rng)
    index = np.arange(1000, 1000 + N_TEST)
    records = []
    for seed in seeds:
        noise = np.random.default_rng(100 + seed).normal(size=y.shape)
        scorers = {
            "random": y + 1.0 * noise,
            "synthetic-transfer": y + 0.3 * np.random.default_rng(200 + seed).normal(size=y.shape),
            "mean-var": y + 1.0 * noise,  # identical to random, seed for seed
            "gabor": np.random.default_rng(300 + seed).normal(size=y.shape),  # chance: no signal at all
        }
        for init, scores in scorers.items():
            path = save_test_predictions(
                tmp_path / f"{init}-{seed}.npz", index=index, scores=scores, targets=y, groups=patients
            )
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
    assert "3 paired seeds" in rows["synthetic-transfer"].auc.basis
    assert "resampled by image" in rows["synthetic-transfer"].auc.basis  # the toy predictions store no patients

    text = transfer_effect_markdown(list(rows.values()))
    header = text.splitlines()[0]
    assert header == "| model | size | init | ΔAUC [95 % CI] | ΔAUPRC [95 % CI] | verdict |"  # seeds: in the caption
    assert "| helps |" in text and "| no detectable difference |" in text and "| hurts |" in text
    assert f"{N_TEST} test images, resampled by image" in text and "mean over 3 paired seeds" in text

    metrics = transfer_effect_metrics(list(rows.values()))
    assert metrics["transfer/cbr-tiny/full/synthetic-transfer/verdict_auc"] == 1.0
    assert metrics["transfer/cbr-tiny/full/gabor/verdict_auc"] == -1.0
    assert metrics["transfer/cbr-tiny/full/mean-var/delta_auc"] == 0.0


def test_stored_patients_resample_by_patient_and_the_caption_says_so(tmp_path):
    patients = np.array([f"patient{i // 3:05d}" for i in range(N_TEST)])
    rows = {r.init: r for r in transfer_effect_table(_grid_records(tmp_path, patients=patients))}
    by_image = {r.init: r for r in transfer_effect_table(_grid_records(tmp_path / "by-image"))}
    better = rows["synthetic-transfer"].auc
    assert better.resampled_by == "patient" and better.delta == by_image["synthetic-transfer"].auc.delta
    assert better.se != by_image["synthetic-transfer"].auc.se  # the same Δ, a different test-set term
    assert f"{N_TEST} test images, resampled by patient" in transfer_effect_markdown(list(rows.values()))


def test_one_seed_has_the_test_set_interval_and_no_verdict(tmp_path):
    rows = {r.init: r for r in transfer_effect_table(_grid_records(tmp_path, seeds=(0,)))}
    better = rows["synthetic-transfer"].auc
    assert better.low > 0 and better.verdict == TOO_FEW_SEEDS and "test-set noise only" in better.basis
    line = next(
        line for line in transfer_effect_markdown(list(rows.values())).splitlines() if "synthetic-trans" in line
    )
    assert "(test set only)" in line and line.endswith(f"| {TOO_FEW_SEEDS} |")
    assert not any(key.endswith("verdict_auc") for key in transfer_effect_metrics(list(rows.values())))


def test_without_predictions_one_seed_has_no_interval_and_no_verdict(tmp_path):
    rows = transfer_effect_table(_grid_records(tmp_path, seeds=(0,), with_predictions=False))
    for row in rows:
        assert math.isnan(row.auc.ci_low) and row.auc.verdict == TOO_FEW_SEEDS
    text = transfer_effect_markdown(rows)
    line = next(line for line in text.splitlines() if "synthetic-transfer" in line)
    assert "[–]" in line and "without stored test predictions" in text
    metrics = transfer_effect_metrics(rows)
    assert "transfer/cbr-tiny/full/gabor/delta_auc" in metrics
    assert not any(key.endswith("verdict_auc") for key in metrics)


def test_report_opens_with_does_transfer_help(tmp_path):
    records = _grid_records(tmp_path / "runs")
    outputs = analyze_records(records, tmp_path / "report", grid_name="toy", dataset="synthetic-retina")
    md, html = write_report(outputs, title="toy")
    text = md.read_text()
    assert text.index("## Does transfer help?") < text.index("## Tables 1–3")
    assert "| cbr-tiny | full | synthetic-transfer | +" in text and "| helps |" in text
    assert "<th>ΔAUC [95 % CI]</th><th>ΔAUPRC [95 % CI]</th><th>verdict</th>" in html.read_text()
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
