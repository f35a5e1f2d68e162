"""transfer_interval is calibrated: simulated grids with a known expected ΔAUC, and small hand-checked cases.

The simulation is binormal: an image's score is ``d_s · y + a · z + b · ε``, where ``z`` is
an image feature that every seed of one init shares (the two inits see partly different
features, correlation ``RHO``: the test-set noise shared by all seeds), ``ε`` is the
seed's own noise on that image (the seed × image interaction) and ``d_s = d + τ g_s`` is
the seed's separation (training noise). The population AUC of one seed is
``Φ(d_s / √(2(a² + b²)))``, so the expected AUC over seeds is ``Φ(d / √(2(a² + b²) + τ²))``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t
from sklearn.metrics import average_precision_score

from transfusion.analysis.transfer_effect import (
    HELPS,
    NO_DIFFERENCE,
    TOO_FEW_SEEDS,
    _auc_deltas_and_covariance,
    _bootstrap_deltas_and_covariance,
    auc_influence,
    transfer_interval,
)
from transfusion.metrics import classification_scores, roc_auc

RHO, D_INIT, D_RANDOM = 0.5, 1.2, 1.0
POSITIVES, NEGATIVES = 60, 90
GRIDS = 400
# (a, b, τ): test-set noise dominates (τ ≈ 0), or training noise dominates (large τ, little test noise).
REGIMES = {"test-noise": (1.0, 0.2, 0.02), "training-noise": (0.5, 0.1, 0.3)}


def _expected_auc(d: float, a: float, b: float, tau: float) -> float:
    return float(norm.cdf(d / math.sqrt(2 * (a * a + b * b) + tau * tau)))


def _grid(rng: np.random.Generator, *, seeds: int, a: float, b: float, tau: float):
    y = np.r_[np.ones(POSITIVES), np.zeros(NEGATIVES)]
    z, w = rng.normal(size=len(y)), rng.normal(size=len(y))

    def runs(d: float, feature: np.ndarray) -> np.ndarray:
        separation = d + tau * rng.normal(size=(seeds, 1))
        return separation * y + a * feature + b * rng.normal(size=(seeds, len(y)))

    return y, runs(D_INIT, z), runs(D_RANDOM, RHO * z + math.sqrt(1 - RHO**2) * w)


@pytest.mark.parametrize("seeds", [3, 5])
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_95_percent_interval_covers_the_expected_difference_in_92_to_98_percent_of_grids(regime, seeds):
    a, b, tau = REGIMES[regime]
    truth = _expected_auc(D_INIT, a, b, tau) - _expected_auc(D_RANDOM, a, b, tau)
    rng = np.random.default_rng(2019 + seeds)
    covered = 0
    for _ in range(GRIDS):
        estimate = transfer_interval(*_grid(rng, seeds=seeds, a=a, b=b, tau=tau))
        covered += estimate.low <= truth <= estimate.high
    assert 0.92 <= covered / GRIDS <= 0.98, f"{regime}, {seeds} seeds: coverage {covered / GRIDS:.3f}"


def test_hand_checked_two_seeds_on_four_images():
    # Seed 0: init perfect (AUC 1), random 0.5 -> Δ 0.5; seed 1: both perfect -> Δ 0.
    y = np.array([1.0, 1.0, 0.0, 0.0])
    init = np.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    random = np.array([[4.0, 1.0, 2.0, 3.0], [3.0, 4.0, 1.0, 2.0]])
    # Random seed 0: the positive at 4 beats both negatives (placement 1), the one at 1 none (0): influences ±1/4;
    # each negative is beaten by one of two positives (placement 1/2 = AUC): influence 0.
    auc, influence = auc_influence(y, random[0])
    assert auc == 0.5 and influence.tolist() == [0.25, -0.25, 0.0, 0.0]
    # Test covariance of (Δ_0, Δ_1) = 4/3 · D Dᵀ = [[1/6, 0], [0, 0]]: V_each 1/12, V_mean 1/24, σ_T² = 0;
    # S² = var(0.5, 0) = 1/8 -> SE² = 1/16, df = 1.
    estimate = transfer_interval(y, init, random)
    assert estimate.delta == pytest.approx(0.25) and estimate.se == pytest.approx(0.25) and estimate.df == 1
    assert estimate.high - estimate.delta == pytest.approx(student_t.ppf(0.975, 1) * 0.25)
    assert estimate.p_value == pytest.approx(0.5) and estimate.verdict == NO_DIFFERENCE
    one = transfer_interval(y, init[:1], random[:1])  # test-set noise only: Σ_00 = 1/6, normal quantile
    assert one.high - one.delta == pytest.approx(1.959964 * math.sqrt(1 / 6), rel=1e-6)
    assert one.verdict == TOO_FEW_SEEDS and "test-set noise only" in one.basis and math.isnan(one.p_value)


def test_one_seed_gives_no_verdict_even_with_a_large_difference():
    rng = np.random.default_rng(0)
    y, init, random = _grid(rng, seeds=1, a=1.0, b=0.5, tau=0.0)
    estimate = transfer_interval(y, init + 1.5 * y, random)  # init separates far better
    assert estimate.low > 0 and estimate.seeds == 1 and estimate.verdict == TOO_FEW_SEEDS


def test_resampling_by_patient_widens_the_interval_when_a_patients_images_agree():
    rng = np.random.default_rng(1)
    patients = 150
    y, init, random = _grid(rng, seeds=3, a=1.0, b=0.05, tau=0.0)
    y, init, random = y[:patients], init[:, :patients], random[:, :patients]
    # Both eyes of a patient: same label, nearly the same scores.
    twice = np.repeat(np.arange(patients), 2)
    init2 = init[:, twice] + 0.01 * rng.normal(size=(3, 2 * patients))
    random2 = random[:, twice] + 0.01 * rng.normal(size=(3, 2 * patients))
    by_image = transfer_interval(y[twice], init2, random2)
    by_patient = transfer_interval(y[twice], init2, random2, groups=twice)
    assert by_patient.delta == by_image.delta and by_patient.resampled_by == "patient"
    # Pairs of copies: the variance doubles, the width grows by about √2.
    assert by_patient.se / by_image.se == pytest.approx(math.sqrt(2), rel=0.1)
    independent = transfer_interval(y[twice], init2, random2, groups=np.arange(2 * patients))
    assert independent.se == pytest.approx(by_image.se)


def test_closed_form_auc_covariance_matches_the_shared_bootstrap():
    rng = np.random.default_rng(3)
    y, init, random = _grid(rng, seeds=3, a=1.0, b=0.5, tau=0.1)
    targets, codes = y[:, None], np.arange(len(y))
    deltas, closed = _auc_deltas_and_covariance(targets, init[..., None], random[..., None], codes, len(y))
    boot_deltas, boot, used = _bootstrap_deltas_and_covariance(
        targets, init[..., None], random[..., None], codes, len(y), metric="auc", replicates=2000, seed=0
    )
    assert used == 2000 and np.allclose(deltas, boot_deltas)
    assert deltas[0] == pytest.approx(roc_auc(y, init[0]) - roc_auc(y, random[0]))
    assert np.diag(boot) == pytest.approx(np.diag(closed), rel=0.15)
    assert boot.mean() == pytest.approx(closed.mean(), rel=0.2)


def test_auprc_interval_is_the_mean_average_precision_difference():
    rng = np.random.default_rng(4)
    y, init, random = _grid(rng, seeds=3, a=0.3, b=0.3, tau=0.05)
    estimate = transfer_interval(y, init + y, random, metric="auprc", replicates=300)
    expected = np.mean(
        [average_precision_score(y, s + y) - average_precision_score(y, r) for s, r in zip(init, random, strict=True)]
    )
    assert estimate.delta == pytest.approx(expected) and estimate.verdict == HELPS
    assert "300 bootstrap replicates" in estimate.basis


def test_a_label_with_one_class_makes_the_macro_undefined_and_is_named():
    rng = np.random.default_rng(5)
    y, init, random = _grid(rng, seeds=2, a=1.0, b=0.2, tau=0.1)
    targets = np.stack([y, np.zeros_like(y)], axis=1)  # "effusion" has no positive test image
    targets[:5, 1] = np.nan
    scores, baseline = np.stack([init, init], axis=2), np.stack([random, random], axis=2)
    estimate = transfer_interval(targets, scores, baseline, label_names=["edema", "effusion"])
    assert math.isnan(estimate.delta) and estimate.undefined_labels == ("effusion",)
    assert "effusion" in estimate.basis and estimate.verdict == "–"
    result = classification_scores(scores[0], targets, ["edema", "effusion"])
    assert math.isnan(result.auc) and result.undefined_labels == ("effusion",) and "edema" in result.per_label_auc


def test_bad_shapes_are_refused_with_the_shapes():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="pair seed by seed"):
        transfer_interval(y, np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="groups must be one id per test image"):
        transfer_interval(y, np.zeros((2, 4)), np.zeros((2, 4)), groups=np.arange(3))
    with pytest.raises(ValueError, match="unknown metric"):
        transfer_interval(y, np.zeros((2, 4)), np.zeros((2, 4)), metric="f1")
