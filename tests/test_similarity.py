"""CCA / SVCCA / PWCCA / CKA: references, cross-checks, invariances, edge cases.

All representations are (examples, features).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfusion.similarity import (
    SIMILARITIES,
    CCAResult,
    ChanceLevel,
    CKAResult,
    PreparedRepresentation,
    _broken_correspondence,  # private, tested directly: how rows are paired for a chance level
    _lower_gram,  # private, tested directly: public calls reach it past 1 024 features
    cca,
    chance_level,
    flatten_conv,
    get_similarity,
    linear_cka,
    list_similarities,
    prepare,
    pwcca,
    rbf_cka,
    similarities_with_chance,
    svcca,
)

REFERENCE_TOL = 1e-6
IDENTITY_TOL = 1e-10


def _reference_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Inputs of the golden values below; y shares 10 of x's 20 dimensions."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 20))
    y = x[:, :10] @ rng.standard_normal((10, 30)) + rng.standard_normal((500, 30))
    return x, y


def _whitened_inputs() -> tuple[np.ndarray, np.ndarray]:
    """x centred with x^T x = I (Cholesky whitening), y = noisy mix of x."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((400, 8))
    a = a - a.mean(axis=0)
    chol = np.linalg.cholesky(a.T @ a)
    xw = a @ np.linalg.inv(chol).T
    yw = xw @ rng.standard_normal((8, 12)) + 2.0 * rng.standard_normal((400, 12))
    return xw, yw


# Golden values. Produced by a throwaway script outside this repository that ran
# google/svcca (commit 1f3fbf1) on the transposed (neurons x datapoints) inputs:
#   cca:   np.mean(cca_core.get_cca_similarity(x.T, y.T, epsilon=eps)["cca_coef1"])
#   svcca: the tutorial pipeline (centre, np.linalg.svd, keep s[:k] * V[:k], then
#          get_cca_similarity at epsilon 0); k fixed or from cca_core.sum_threshold
#          applied to s ("mass") or s**2 ("squared")
#   pwcca: pwcca.compute_pwcca(xw.T, yw.T, epsilon=0) on _whitened_inputs(), where
#          its raw inner products equal our correlations
# and a reimplementation of Kornblith et al.'s CKA demo (gram_linear, gram_rbf
# with np.median over all n^2 squared distances, center_gram, cka,
# feature_space_linear_cka).
GOLDEN_CCA = 0.5812847692872511
GOLDEN_CCA_TOP3 = (0.9934849556278139, 0.9912328918607318, 0.9889919159967513)
GOLDEN_CCA_EPS_1E3 = 0.5794901463999579
GOLDEN_SVCCA_DIMS10 = 0.5715799216950863
GOLDEN_SVCCA_MASS_090 = 0.5688852351418365  # keeps (18, 22) directions
GOLDEN_SVCCA_SQUARED_090 = 0.9268783910866725  # keeps (18, 9) directions
GOLDEN_LINEAR_CKA = 0.6089004812479708
GOLDEN_RBF_CKA_1 = 0.6151076489598086
GOLDEN_RBF_CKA_05 = 0.6123426028361365
GOLDEN_PWCCA = 0.15597027554891077
GOLDEN_PWCCA_WEIGHTS = (
    0.12599935405889945,
    0.1229976707203751,
    0.1229311645993435,
    0.13756676671964427,
    0.11874620458203221,
    0.12286359742319733,
    0.1253482789556532,
    0.12354696294085488,
)


def _exact_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations from full numpy SVDs of the centred data."""
    bases = []
    for a in (x, y):
        u, s, _ = np.linalg.svd(a - a.mean(axis=0), full_matrices=False)
        bases.append(u[:, s > s[0] * 1e-9])
    return np.linalg.svd(bases[0].T @ bases[1], compute_uv=False)


def _random_orthogonal(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((size, size)))[0]


# ---------------------------------------------------------------- reference values


def test_cca_matches_google_svcca() -> None:
    x, y = _reference_inputs()
    result = cca(x, y)
    assert isinstance(result, CCAResult)
    assert result.score == pytest.approx(GOLDEN_CCA, abs=REFERENCE_TOL)
    assert result.coefficients.dtype == np.float64
    assert len(result.coefficients) == 20
    np.testing.assert_allclose(result.coefficients[:3], GOLDEN_CCA_TOP3, atol=REFERENCE_TOL)
    assert np.all(np.diff(result.coefficients) <= 0)


def test_cca_epsilon_matches_google_ridge() -> None:
    x, y = _reference_inputs()
    assert cca(x, y, epsilon=1e-3).score == pytest.approx(GOLDEN_CCA_EPS_1E3, abs=REFERENCE_TOL)


@pytest.mark.parametrize(
    ("options", "golden", "dims"),
    [
        ({"dims": 10}, GOLDEN_SVCCA_DIMS10, (10, 10)),
        ({"keep": 0.9, "variance": "mass"}, GOLDEN_SVCCA_MASS_090, (18, 22)),
        ({"keep": 0.9, "variance": "squared"}, GOLDEN_SVCCA_SQUARED_090, (18, 9)),
    ],
)
def test_svcca_matches_google_tutorial(options: dict, golden: float, dims: tuple) -> None:
    x, y = _reference_inputs()
    result = svcca(x, y, **options)
    assert result.dims == dims
    assert result.score == pytest.approx(golden, abs=REFERENCE_TOL)


def test_cka_matches_kornblith_demo() -> None:
    x, y = _reference_inputs()
    for method in ("auto", "gram", "features"):
        score = linear_cka(x, y, method=method).score
        assert score == pytest.approx(GOLDEN_LINEAR_CKA, abs=REFERENCE_TOL)
    assert rbf_cka(x, y).score == pytest.approx(GOLDEN_RBF_CKA_1, abs=REFERENCE_TOL)
    assert rbf_cka(x, y, threshold=0.5).score == pytest.approx(GOLDEN_RBF_CKA_05, abs=REFERENCE_TOL)


def test_pwcca_matches_google_on_whitened_input() -> None:
    xw, yw = _whitened_inputs()
    result = pwcca(xw, yw)
    assert result.score == pytest.approx(GOLDEN_PWCCA, abs=REFERENCE_TOL)
    np.testing.assert_allclose(result.weights, GOLDEN_PWCCA_WEIGHTS, atol=REFERENCE_TOL)


def test_pwcca_correlation_weighting_matches_its_definition() -> None:
    """weighting="correlation": weight_i = sum_j |corr(canonical variate i of x, neuron j of x)|, normalised."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 1.0
    y = x @ rng.standard_normal((6, 9)) + 3.0 * rng.standard_normal((300, 9))
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    ux = np.linalg.svd(xc, full_matrices=False)[0]
    uy = np.linalg.svd(yc, full_matrices=False)[0]
    a, rho, _ = np.linalg.svd(ux.T @ uy, full_matrices=False)
    variates = ux @ a
    corr = np.array([[np.corrcoef(h, xj)[0, 1] for xj in x.T] for h in variates.T])
    weights = np.abs(corr).sum(axis=1)
    weights /= weights.sum()

    result = pwcca(x, y, weighting="correlation")
    np.testing.assert_allclose(result.weights, weights, atol=1e-10)
    assert result.score == pytest.approx(float(weights @ rho), abs=1e-10)
    assert result.weights.sum() == pytest.approx(1.0)


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return (v / np.sqrt(w)) @ v.T


def _published_pwcca(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """From-scratch reference of PWCCA as Morcos et al. publish it (examples x features).

    Covariance CCA: SVD of Sxx^-1/2 Sxy Syy^-1/2. The side with fewer non-constant
    features gives the directions: its singular vectors applied to its centred
    features, feature i's mean added to direction i, orthonormalised in order by
    QR, then |projections| onto that side's uncentred features summed per direction.
    The sign of each singular vector is fixed so its largest entry is positive.
    """
    x, y = x[:, x.std(axis=0) > 0], y[:, y.std(axis=0) > 0]
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    n = len(x)
    sxx, syy, sxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    u, rho, vt = np.linalg.svd(_inverse_sqrt(sxx) @ sxy @ _inverse_sqrt(syy))
    if x.shape[1] <= y.shape[1]:
        coef, acts, centred, means = u.T, x, xc, mx
    else:
        coef, acts, centred, means = vt, y, yc, my
    coef = coef[: len(rho)]
    coef = coef * np.sign(coef[np.arange(len(coef)), np.abs(coef).argmax(axis=1)])[:, None]
    directions = coef @ centred.T + means[: len(rho), None]
    q, _ = np.linalg.qr(directions.T)
    weights = np.abs(q.T @ acts).sum(axis=1)
    weights /= weights.sum()
    return float(weights @ rho), weights


def _relu_like_pair(rng: np.random.Generator, n: int, wx: int, wy: int, dead: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.maximum(rng.standard_normal((n, wx)) @ rng.standard_normal((wx, wx)) + 0.7, 0.0)
    x[:, :dead] = 0.0
    y = np.maximum(x @ rng.standard_normal((wx, wy)) + rng.standard_normal((n, wy)), 0.0) + 2.0
    return x, y


@pytest.mark.parametrize(
    ("widths", "dead"),
    [((12, 12), 0), ((10, 17), 0), ((17, 10), 0), ((16, 24), 3), ((24, 16), 2)],
    ids=["equal", "x-narrower", "y-narrower", "dead-in-narrower", "dead-in-wider"],
)
def test_pwcca_matches_published_reference(widths: tuple[int, int], dead: int) -> None:
    """Default: the published method on centred activations; centred=False: on raw ones, sign-fixed."""
    rng = np.random.default_rng(sum(widths) + dead)
    x, y = _relu_like_pair(rng, 3000, *widths, dead)
    for centred, inputs in ((True, (x - x.mean(axis=0), y - y.mean(axis=0))), (False, (x, y))):
        golden, golden_weights = _published_pwcca(*inputs)
        result = pwcca(x, y, centred=centred)
        assert result.score == pytest.approx(golden, abs=REFERENCE_TOL), centred
        np.testing.assert_allclose(result.weights, golden_weights, atol=REFERENCE_TOL)
        # The side is picked by width, so the argument order matters only on a tie (then x).
        if (x.std(axis=0) > 0).sum() != (y.std(axis=0) > 0).sum():
            assert pwcca(y, x, centred=centred).score == pytest.approx(golden, abs=REFERENCE_TOL)


def test_pwcca_published_differs_from_correlation_weighting_on_offsets() -> None:
    x, y = _relu_like_pair(np.random.default_rng(11), 2000, 10, 14, 0)
    published = pwcca(x, y, centred=False).score
    assert published == pytest.approx(_published_pwcca(x, y)[0], abs=REFERENCE_TOL)
    assert abs(published - pwcca(x, y, weighting="correlation").score) > 1e-4
    assert abs(published - pwcca(x, y).score) > 1e-4  # the offsets move the uncentred variant
    with pytest.raises(ValueError, match="weighting must be one of"):
        pwcca(x, y, weighting="both")
    with pytest.raises(ValueError, match="centred must be True or False"):
        pwcca(x, y, centred="yes")


def _flipping_svd(rng: np.random.Generator):
    """torch.linalg.svd whose singular vectors get random signs (u_i and v_i flipped together): still an SVD."""
    svd = torch.linalg.svd

    def flipped(m, *args, **kwargs):
        u, s, vh = svd(m, *args, **kwargs)
        signs = torch.from_numpy(rng.choice([-1.0, 1.0], size=s.shape[-1])).to(u.dtype)
        return u * signs[None, :], s, vh * signs[:, None]

    return flipped


def test_default_pwcca_does_not_depend_on_svd_signs_or_neuron_order(monkeypatch) -> None:
    x, y = _relu_like_pair(np.random.default_rng(21), 2000, 12, 18, 1)
    centred, uncentred = pwcca(x, y).score, pwcca(x, y, centred=False).score
    rng = np.random.default_rng(0)
    flip = rng.choice([-1.0, 1.0], size=x.shape[1])
    shuffled = rng.permutation(x.shape[1])
    # Permuting and sign-flipping neurons is a new pair for LAPACK: different signs and rounding.
    assert pwcca(x[:, shuffled] * flip[shuffled], y).score == pytest.approx(centred, abs=1e-9)
    monkeypatch.setattr(torch.linalg, "svd", _flipping_svd(np.random.default_rng(1)))
    moved = []
    for _ in range(8):
        assert pwcca(x, y).score == pytest.approx(centred, abs=1e-9)
        moved.append(abs(pwcca(x, y, centred=False).score - uncentred))
    # The uncentred variant is stable only because it fixes the signs itself.
    assert max(moved) < 1e-9


# ---------------------------------------------------------------- chance levels


def test_chance_level_of_independent_data_equals_the_measure() -> None:
    """Unrelated data: permuting rows changes nothing, so the floor is the score itself."""
    rng = np.random.default_rng(12)
    x, z = rng.standard_normal((1280, 64)), rng.standard_normal((1280, 64))
    for measure in ("svcca", "pwcca", "cca", "linear_cka"):
        score = get_similarity(measure)(x, z).score
        chance = chance_level(x, z, measure=measure, repeats=4)
        assert isinstance(chance, ChanceLevel)
        assert len(chance.scores) == 4
        assert chance.mean == pytest.approx(score, rel=0.15), measure
        assert chance.std < 0.1 * chance.mean


def test_chance_level_is_far_below_the_measure_on_related_data() -> None:
    rng = np.random.default_rng(13)
    x = rng.standard_normal((1280, 32))
    y = x @ rng.standard_normal((32, 48)) + 0.5 * rng.standard_normal((1280, 48))
    for measure in ("svcca", "pwcca", "linear_cka", "rbf_cka"):
        rows = 300 if measure == "rbf_cka" else 1280
        score = get_similarity(measure)(x[:rows], y[:rows]).score
        chance = chance_level(x[:rows], y[:rows], measure=measure, repeats=3)
        assert score > 0.7, measure
        assert chance.mean < 0.3 * score, measure


def test_chance_level_groups_permute_whole_images() -> None:
    """Rows are (image, position) and image content is shared by an image's positions.

    The honest floor is two unrelated representations with that same structure
    (few effective examples: the images). Permuting whole images reproduces it;
    permuting single rows scatters each image's content and understates it.
    """
    rng = np.random.default_rng(14)
    images, positions = 40, 16
    groups = np.repeat(np.arange(images), positions)

    def structured(content_dims: int) -> np.ndarray:
        content = rng.standard_normal((images, content_dims))[groups]
        return np.hstack([content, rng.standard_normal((len(groups), 16 - content_dims))])

    x = structured(8)
    y = x[:, :8] @ rng.standard_normal((8, 16)) + 0.3 * structured(8)
    unrelated = np.mean([cca(x, structured(8)).score for _ in range(5)])
    grouped = chance_level(x, y, measure="cca", groups=groups, seed=1)
    by_rows = chance_level(x, y, measure="cca", seed=1)
    assert grouped.grouped and not by_rows.grouped
    assert grouped.mean == pytest.approx(unrelated, abs=0.04)
    assert by_rows.mean < unrelated - 0.05
    assert cca(x, y).score > grouped.mean + 0.2


def test_grouped_permutation_maps_each_image_onto_one_other_image() -> None:
    groups = np.repeat(np.array([7, 3, 5, 9, 1]), 4)
    order = _broken_correspondence(len(groups), groups, np.random.default_rng(0))
    assert sorted(order) == list(range(len(groups)))
    for label in np.unique(groups):
        partners = set(groups[order[groups == label]])
        assert len(partners) == 1 and label not in partners
    rows = _broken_correspondence(50, None, np.random.default_rng(0))
    assert sorted(rows) == list(range(50)) and not np.any(rows == np.arange(50))


def test_grouped_derangement_never_pairs_a_row_with_its_own_image_for_unequal_sizes() -> None:
    groups = np.repeat(np.arange(7), [1, 9, 3, 5, 2, 8, 4])
    for seed in range(50):
        order = _broken_correspondence(len(groups), groups, np.random.default_rng(seed))
        assert sorted(order) == list(range(len(groups)))
        assert not np.any(groups[order] == groups)
    with pytest.raises(ValueError, match="at most half"):
        _broken_correspondence(10, np.repeat([0, 1], [6, 4]), np.random.default_rng(0))


def test_same_position_pairing_for_every_layer_of_a_probe() -> None:
    """Null pairs keep the position and change the image: 100 % same (h, w), 0 % within-image, every layer."""
    from transfusion.probes import ProbeSampling, sample_positions

    sampling = ProbeSampling(rows_per_channel=10, seed=0)
    shapes = {"conv1": (64, 24), "stage1": (64, 12), "stage2": (128, 6), "stage3": (256, 3)}
    for layer, (channels, side) in shapes.items():
        rows = sample_positions(layer, images=32, height=side, width=side, channels=channels, sampling=sampling)
        for seed in range(3):
            order = _broken_correspondence(len(rows), rows[:, 0], np.random.default_rng(seed), rows[:, 1:])
            assert sorted(order) == list(range(len(rows)))
            assert np.all(rows[order, 1:] == rows[:, 1:]), layer
            assert not np.any(rows[order, 0] == rows[:, 0]), layer
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((len(rows), 4)), rng.standard_normal((len(rows), 4))
    assert chance_level(x, y, measure="cca", groups=rows[:, 0], positions=rows[:, 1:], repeats=2).grouped
    # Images at different positions (an old probe) have no same-position partner for every row.
    moved = rows.copy()
    moved[0, 1:] = moved[1, 1:]  # image 0 samples one position twice, another not at all
    with pytest.raises(ValueError, match="different positions"):
        chance_level(x, y, measure="cca", groups=moved[:, 0], positions=moved[:, 1:])
    with pytest.raises(ValueError, match="positions need groups"):
        chance_level(x, y, measure="cca", positions=rows[:, 1:])


def test_similarities_with_chance_equals_separate_calls() -> None:
    rng = np.random.default_rng(16)
    images, positions = 40, 12
    groups, where = np.repeat(np.arange(images), positions), np.tile(np.arange(positions), images)
    x = np.maximum(rng.standard_normal((images * positions, 24)) @ rng.standard_normal((24, 24)) + 0.3, 0)
    y = np.maximum(x @ rng.standard_normal((24, 30)) + rng.standard_normal((images * positions, 30)), 0)
    measures = ("svcca", "pwcca", "linear_cka", "cca")
    options = {"svcca": {"keep": 0.9}, "pwcca": {"centred": False}}
    # rbf_cka shares nothing (it needs raw rows) and is computed on its own.
    for inputs, asked in (((x, y), (*measures, "rbf_cka")), ((prepare(x), prepare(y)), measures)):
        shared = similarities_with_chance(
            *inputs, measures=asked, options=options, repeats=3, seed=5, groups=groups, positions=where
        )
        assert list(shared) == list(asked)
        for measure in asked:
            alone = get_similarity(measure)(x, y, **options.get(measure, {}))
            chance = chance_level(x, y, measure=measure, repeats=3, seed=5, groups=groups, positions=where,
                                  options=options.get(measure))  # fmt: skip
            assert shared[measure].result.score == pytest.approx(alone.score, abs=1e-9), measure
            np.testing.assert_allclose(shared[measure].chance.scores, chance.scores, atol=1e-9, rtol=0)
            assert shared[measure].chance.grouped and chance.mean < alone.score, measure


def test_chance_level_reuses_prepared_representations_and_validates() -> None:
    rng = np.random.default_rng(15)
    x, y = rng.standard_normal((400, 10)), rng.standard_normal((400, 12))
    px, py = prepare(x), prepare(y)
    raw = chance_level(x, y, measure="pwcca", seed=3)
    prepared = chance_level(px, py, measure="pwcca", seed=3)
    np.testing.assert_allclose(prepared.scores, raw.scores, atol=1e-12)
    assert chance_level(x, y, seed=3).scores != chance_level(x, y, seed=4).scores
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        chance_level(x, y, repeats=0)
    with pytest.raises(ValueError, match="one label per row"):
        chance_level(x, y, groups=np.zeros(3))
    with pytest.raises(ValueError, match="single label"):
        chance_level(x, y, groups=np.zeros(400))
    with pytest.raises(ValueError, match="similarity measure"):
        chance_level(x, y, measure="nope")


# ------------------------------------------------------------------- cross-checks


@pytest.mark.parametrize("shape", [(200, 15), (12, 40)], ids=["covariance", "gram"])
def test_cca_of_x_with_itself_is_one(shape: tuple[int, int]) -> None:
    x = np.random.default_rng(4).standard_normal(shape)
    result = cca(x, x)
    assert result.score == pytest.approx(1.0, abs=IDENTITY_TOL)
    assert len(result.coefficients) == min(shape[0] - 1, shape[1])
    assert svcca(x, x).score == pytest.approx(1.0, abs=IDENTITY_TOL)
    assert linear_cka(x, x).score == pytest.approx(1.0, abs=IDENTITY_TOL)
    assert rbf_cka(x, x).score == pytest.approx(1.0, abs=IDENTITY_TOL)
    assert pwcca(x, x).score == pytest.approx(1.0, abs=IDENTITY_TOL)


@pytest.mark.parametrize("measure", [cca, svcca, linear_cka], ids=lambda f: f.__name__)
def test_invariant_to_orthogonal_transform_scaling_and_shift(measure) -> None:
    x, y = _reference_inputs()
    rng = np.random.default_rng(5)
    transformed = 3.7 * (x @ _random_orthogonal(rng, x.shape[1])) + 11.0
    assert measure(transformed, y).score == pytest.approx(measure(x, y).score, abs=1e-10)
    assert measure(x, 0.01 * y).score == pytest.approx(measure(x, y).score, abs=1e-10)


def test_cca_invariant_to_invertible_linear_maps() -> None:
    x, y = _reference_inputs()
    mixing = np.random.default_rng(6).standard_normal((20, 20))
    assert cca(x @ mixing, y).score == pytest.approx(cca(x, y).score, abs=1e-9)


def test_linear_cka_from_examples_equals_from_features() -> None:
    rng = np.random.default_rng(7)
    for shape_x, shape_y in [((60, 10), (60, 25)), ((30, 80), (30, 45))]:
        x = rng.standard_normal(shape_x)
        y = np.tanh(x[:, :5] @ rng.standard_normal((5, shape_y[1]))) + rng.standard_normal(shape_y)
        by_gram = linear_cka(x, y, method="gram").score
        by_features = linear_cka(x, y, method="features").score
        assert by_gram == pytest.approx(by_features, abs=1e-12)
        assert linear_cka(x, y).score == pytest.approx(by_gram, abs=1e-12)
        assert linear_cka(prepare(x), prepare(y)).score == pytest.approx(by_gram, abs=1e-12)


def test_svcca_keeping_all_variance_equals_cca() -> None:
    x, y = _reference_inputs()
    full = svcca(x, y, keep=1.0)
    assert full.dims == (20, 30)
    assert full.score == pytest.approx(cca(x, y).score, abs=1e-12)
    np.testing.assert_allclose(full.coefficients, cca(x, y).coefficients, atol=1e-12)


def test_svcca_dims_beyond_rank_keeps_the_rank() -> None:
    x, y = _reference_inputs()
    assert svcca(x, y, dims=500).dims == (20, 30)


def _orthonormal_columns(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    # torch's QR: numpy's is slow enough on a loaded 2-core runner to dominate the file.
    return torch.linalg.qr(torch.from_numpy(rng.standard_normal((rows, cols)))).Q.numpy()


@pytest.mark.parametrize("shape", [(600, 60), (80, 200)], ids=["covariance", "gram"])
def test_ill_conditioned_input_matches_exact_svd(shape: tuple[int, int]) -> None:
    """Singular values spanning 10^5.5: without re-orthonormalising the basis built
    from the covariance, coefficients are off by ~6e-8 here."""
    n, p = shape
    rng = np.random.default_rng(8)
    r = min(n - 1, p)

    def spread(decades: float) -> np.ndarray:
        left = _orthonormal_columns(rng, n, r)
        left -= left.mean(axis=0)  # keep the spectrum after centring
        right = _orthonormal_columns(rng, p, r).T
        return (left * np.logspace(0, -decades, r)) @ right

    x = spread(5.5)
    y = 0.5 * x @ rng.standard_normal((p, p)) + spread(2)
    exact = _exact_cca(x, y)
    ours = cca(x, y).coefficients
    assert len(ours) == len(exact) == r
    np.testing.assert_allclose(ours, exact, atol=1e-10)


def test_covariance_panels_match_the_full_product() -> None:
    """Past 2 panels of features, prepare() builds only the lower triangle of X^T X."""
    a = torch.from_numpy(np.random.default_rng(15).standard_normal((60, 45)))
    panels = _lower_gram(a, panel=8)
    full = a.T @ a
    torch.testing.assert_close(torch.tril(panels), torch.tril(full), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.eigvalsh(panels), torch.linalg.eigvalsh(full), rtol=0, atol=1e-10)


# ------------------------------------------------------------------- edge cases


def test_rank_deficient_inputs_give_min_rank_coefficients() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((100, 5)) @ rng.standard_normal((5, 12))  # rank 5
    y = rng.standard_normal((100, 3)) @ rng.standard_normal((3, 7))  # rank 3
    for result in (cca(x, y), svcca(x, y, keep=1.0), pwcca(x, y)):
        assert len(result.coefficients) == 3
        assert np.isfinite(result.score)
    assert prepare(x).rank == 5
    assert cca(x, x).score == pytest.approx(1.0, abs=IDENTITY_TOL)
    # More features than examples: rank is capped by examples - 1 after centring.
    wide = rng.standard_normal((10, 40))
    assert len(cca(wide, rng.standard_normal((10, 50))).coefficients) == 9


def test_constant_neurons_are_dropped_without_nan() -> None:
    x, y = _reference_inputs()
    x_const = np.concatenate([x, np.full((500, 3), 7.5), np.zeros((500, 1))], axis=1)
    prepared = prepare(x_const)
    assert prepared.constant_features == 4
    assert prepared.num_features == 24
    for measure in (cca, svcca, pwcca, linear_cka, rbf_cka):
        score = measure(x_const, y).score
        assert np.isfinite(score)
        assert score == pytest.approx(measure(x, y).score, abs=1e-10)


def test_constant_representation_raises() -> None:
    x, _ = _reference_inputs()
    constant = np.ones((500, 4))
    for measure in (cca, svcca, pwcca, linear_cka):
        with pytest.raises(ValueError, match="constant|variance"):
            measure(constant, x)


@pytest.mark.parametrize("measure", [cca, svcca, pwcca, linear_cka, rbf_cka], ids=lambda f: f.__name__)
def test_bad_shapes_raise_value_error(measure) -> None:
    x, y = _reference_inputs()
    with pytest.raises(ValueError, match="500 examples .* but y has 499"):
        measure(x, y[:499])
    with pytest.raises(ValueError, match="empty"):
        measure(x[:0], y[:0])
    with pytest.raises(ValueError, match="2-D"):
        measure(x[:, 0], y)
    for value in (np.nan, np.inf):
        bad = x.copy()
        bad[3, 4] = value
        with pytest.raises(ValueError, match="NaN or infinite"):
            measure(bad, y)


def test_options_are_keyword_only_and_validated() -> None:
    x, y = _reference_inputs()
    with pytest.raises(TypeError):
        cca(x, y, 0.1)  # type: ignore[misc]
    with pytest.raises(ValueError, match="keep"):
        svcca(x, y, keep=1.5)
    with pytest.raises(ValueError, match="variance"):
        svcca(x, y, variance="energy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dims"):
        svcca(x, y, dims=0)
    with pytest.raises(ValueError, match="epsilon"):
        cca(x, y, epsilon=-1.0)
    with pytest.raises(ValueError, match="method"):
        linear_cka(x, y, method="kernel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        rbf_cka(x, y, threshold=0.0)


# ------------------------------------------------------------- prepared / devices


def test_prepared_and_raw_give_identical_results() -> None:
    x, y = _reference_inputs()
    px, py = prepare(x), prepare(y)
    assert isinstance(px, PreparedRepresentation)
    assert px.rank == 20 and not px.truncated
    basis = px.basis.numpy()
    np.testing.assert_allclose(basis.T @ basis, np.eye(20), atol=1e-12)
    assert cca(px, py).score == cca(x, y).score
    assert cca(px, y).score == cca(x, y).score
    assert pwcca(px, py).score == pwcca(x, y).score
    assert linear_cka(px, py).score == pytest.approx(linear_cka(x, y).score, abs=1e-12)
    for options in ({}, {"keep": 0.9, "variance": "mass"}, {"dims": 7}):
        raw = svcca(x, y, **options)
        assert svcca(px, py, **options).score == pytest.approx(raw.score, abs=1e-12)
        truncated = svcca(prepare(x, **options), prepare(y, **options), **options)
        assert truncated.dims == raw.dims
        assert truncated.score == pytest.approx(raw.score, abs=1e-12)


def test_truncated_preparation_is_refused_where_it_would_mislead() -> None:
    x, y = _reference_inputs()
    small = prepare(x, dims=5)
    assert small.truncated and small.directions == 5 and small.rank == 20
    for measure in (cca, pwcca, linear_cka):
        with pytest.raises(ValueError, match="truncat"):
            measure(small, y)
    with pytest.raises(ValueError, match="needs 10 directions"):
        svcca(small, y, dims=10)
    with pytest.raises(ValueError, match="raw activations"):
        rbf_cka(small, y)  # type: ignore[arg-type]


def test_torch_input_equals_numpy_input() -> None:
    x, y = _reference_inputs()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    for measure in (cca, svcca, pwcca, linear_cka, rbf_cka):
        assert measure(tx, ty).score == pytest.approx(measure(x, y).score, abs=1e-12)
        assert measure(tx, y).score == pytest.approx(measure(x, y).score, abs=1e-12)
    # float32 tensors are promoted to float64 before any arithmetic
    x32 = x.astype(np.float32)
    assert cca(torch.from_numpy(x32), ty).score == pytest.approx(cca(x32, y).score, abs=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_computed_on_device() -> None:
    x, y = _reference_inputs()
    tx, ty = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    assert prepare(tx).basis.device.type == "cuda"
    for measure in (cca, svcca, pwcca, linear_cka, rbf_cka):
        assert measure(tx, ty).score == pytest.approx(measure(x, y).score, abs=1e-9)
    with pytest.raises(ValueError, match="device"):
        cca(tx, torch.from_numpy(y))


# ------------------------------------------------------------------ flatten_conv


def test_flatten_conv_examples_makes_positions_rows() -> None:
    act = np.random.default_rng(10).standard_normal((2, 3, 4, 5))
    rows = flatten_conv(act)
    assert rows.shape == (2 * 4 * 5, 3)
    n, h, w = 1, 2, 3
    np.testing.assert_array_equal(rows[(n * 4 + h) * 5 + w], act[n, :, h, w])


def test_flatten_conv_pool_averages_positions() -> None:
    act = np.random.default_rng(11).standard_normal((2, 3, 4, 5))
    pooled = flatten_conv(act, method="pool")
    assert pooled.shape == (2, 3)
    np.testing.assert_allclose(pooled[1, 2], act[1, 2].mean())


def test_flatten_conv_subsample_is_a_seeded_subset() -> None:
    act = np.random.default_rng(12).standard_normal((4, 3, 6, 6))
    every = flatten_conv(act)
    sub = flatten_conv(act, method="subsample", max_examples=50, seed=3)
    assert sub.shape == (50, 3)
    matches = [np.flatnonzero((every == row).all(axis=1)) for row in sub]
    order = [int(m[0]) for m in matches]
    assert all(len(m) == 1 for m in matches) and order == sorted(order)
    np.testing.assert_array_equal(sub, flatten_conv(act, method="subsample", max_examples=50, seed=3))
    assert not np.array_equal(sub, flatten_conv(act, method="subsample", max_examples=50, seed=4))
    # same positions for a second map of the same (N, H, W): rows still correspond
    other = np.random.default_rng(13).standard_normal((4, 7, 6, 6))
    sub_other = flatten_conv(other, method="subsample", max_examples=50, seed=3)
    np.testing.assert_array_equal(sub_other, flatten_conv(other)[order])
    # a budget above N*H*W keeps every row
    assert flatten_conv(act, method="subsample", max_examples=10_000).shape == every.shape


@pytest.mark.parametrize("method", ["examples", "pool", "subsample"])
def test_flatten_conv_torch_matches_numpy(method: str) -> None:
    act = np.random.default_rng(14).standard_normal((3, 2, 5, 4))
    budget = 20 if method == "subsample" else None
    out_np = flatten_conv(act, method=method, max_examples=budget)
    out_t = flatten_conv(torch.from_numpy(act), method=method, max_examples=budget)
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out_np)


def test_flatten_conv_passes_2d_through_and_validates() -> None:
    flat = np.ones((6, 3))
    assert flatten_conv(flat) is flat
    with pytest.raises(ValueError, match="method"):
        flatten_conv(flat, method="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_examples"):
        flatten_conv(np.ones((1, 2, 3, 3)), method="subsample")
    with pytest.raises(ValueError, match="only applies"):
        flatten_conv(np.ones((1, 2, 3, 3)), max_examples=4)
    with pytest.raises(ValueError, match="N, C, H, W"):
        flatten_conv(np.ones((2, 3, 4)))


# ---------------------------------------------------------------------- registry


def test_registry_lists_the_paper_measures_sorted() -> None:
    names = list_similarities()
    assert {"cca", "svcca", "pwcca", "linear_cka", "rbf_cka"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_similarities())
def test_every_registered_measure_scores_in_unit_interval(name: str) -> None:
    x, y = _reference_inputs()
    measure = get_similarity(name)
    assert measure is SIMILARITIES.get(name)
    result = measure(x[:100], y[:100])
    assert isinstance(result, (CCAResult, CKAResult))
    # A representation is identical to itself; two different ones score strictly between 0 and that.
    assert measure(x[:100], x[:100]).score == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < result.score < 1.0 - 1e-6


def test_unknown_similarity_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="procrustes") as error:
        get_similarity("procrustes")
    assert all(name in str(error.value) for name in list_similarities())
