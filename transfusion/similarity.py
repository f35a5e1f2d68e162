"""Representation similarity: CCA, SVCCA, PWCCA and linear/RBF CKA.

Layout: every representation here is a 2-D array of shape (examples, features) --
one row per datapoint, one column per neuron or channel. google/svcca uses the
transpose (neurons x datapoints); transpose before comparing numbers with it.
Convolutional maps (N, C, H, W) become 2-D with :func:`flatten_conv`.

Measures (each returns a frozen result object with a float ``score``):

- :func:`cca`: mean canonical correlation between the column spaces of the two
  centred representations (Hotelling 1936), as in google/svcca
  ``cca_core.get_cca_similarity`` at ``epsilon=0``.
- :func:`svcca`: keep the top singular directions of each representation, then
  CCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein 2017, "SVCCA", arXiv:1706.05806).
- :func:`pwcca`: projection-weighted CCA (Morcos, Raghu & Bengio 2018,
  "Insights on representational similarity in neural networks with canonical
  correlation", arXiv:1806.05759), weighted as google/svcca
  ``pwcca.compute_pwcca`` does (with its second branch fixed), on centred
  activations by default so that the value does not depend on SVD signs.
- :func:`linear_cka`, :func:`rbf_cka`: centred kernel alignment (Kornblith,
  Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations
  Revisited", arXiv:1905.00414).

:func:`chance_level` scores a measure on pairs whose row correspondence is broken
(rows of y permuted; with (image, position) rows, each row paired with the same
position of another image): what two unrelated representations of these shapes
score. :func:`similarities_with_chance` does it for several measures at once. With rows
close to features every CCA-family score is near 1 by chance alone.

Raghu, Zhang, Kleinberg & Bengio 2019 ("Transfusion", arXiv:1902.07208) use
(SV)CCA to compare layers of networks trained from random and pretrained inits.

Numerics: everything is computed in float64 with torch, on the CPU for numpy
input or on the device of the torch tensors given. The CCA family works on an
orthonormal basis of each centred representation (:func:`prepare`), so the
canonical correlations are the singular values of ``Ux^T Uy`` -- no covariance
inverse, so rank-deficient inputs give ``min(rank x, rank y)`` coefficients
instead of NaN. The basis comes from an eigendecomposition of the smaller of the
features x features covariance and the examples x examples Gram matrix, which
for 20 000 x 2 048 activations is much cheaper than a full SVD; prepare each
representation once and pass the :class:`PreparedRepresentation` to every
comparison it takes part in. Squaring the data costs resolution at the bottom of
the spectrum: directions with singular value below
``s_1 * sqrt(10 * max(examples, features) * eps)`` (about 7e-6 s_1 at 20 000
examples) count as numerically zero and do not add to the rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from transfusion.registry import Registry

__all__ = [
    "SIMILARITIES",
    "CCAResult",
    "CKAResult",
    "ChanceLevel",
    "PWCCAResult",
    "PreparedRepresentation",
    "SVCCAResult",
    "ScoreWithChance",
    "cca",
    "chance_level",
    "flatten_conv",
    "get_similarity",
    "linear_cka",
    "list_similarities",
    "prepare",
    "pwcca",
    "rbf_cka",
    "similarities_with_chance",
    "svcca",
]

logger = logging.getLogger(__name__)

Array = np.ndarray | torch.Tensor
Variance = Literal["squared", "mass"]
Weighting = Literal["projection", "correlation"]

_VARIANCE_CHOICES = ("squared", "mass")
_WEIGHTING_CHOICES = ("projection", "correlation")
_CKA_METHODS = ("auto", "gram", "features")
_FLATTEN_METHODS = ("examples", "pool", "subsample")
_EPS = float(torch.finfo(torch.float64).eps)
# Eigenvalues of X^T X below this fraction (times max(examples, features)) of the
# largest are rounding noise: squaring the data leaves about eps * lambda_max of
# absolute error on every eigenvalue.
_RANK_RTOL = 10.0 * _EPS
# Below this ratio s_k / s_1 the basis X V / s loses orthogonality (error about
# eps * (s_1 / s_k)^2), so it is re-orthonormalised once.
_REFINE_BELOW = 1e-4


@dataclass(frozen=True, eq=False)
class CCAResult:
    """Mean canonical correlation.

    Attributes:
        score: Mean of ``coefficients``.
        coefficients: Canonical correlations in [0, 1], sorted descending;
            ``min(rank x, rank y)`` of them (float64 numpy array).
    """

    score: float
    coefficients: np.ndarray


@dataclass(frozen=True, eq=False)
class SVCCAResult(CCAResult):
    """CCA after SVD truncation.

    Attributes:
        dims: Singular directions kept for (x, y).
    """

    dims: tuple[int, int]


@dataclass(frozen=True, eq=False)
class PWCCAResult(CCAResult):
    """Projection-weighted CCA; ``score`` is the weighted mean of ``coefficients``.

    Attributes:
        weights: Non-negative weight of each canonical direction, summing to 1.
    """

    weights: np.ndarray


@dataclass(frozen=True)
class CKAResult:
    """Centred kernel alignment.

    Attributes:
        score: CKA in [0, 1].
    """

    score: float


@dataclass(frozen=True, eq=False)
class PreparedRepresentation:
    """Per-representation work for the CCA family, computed once by :func:`prepare`.

    The source activations are (examples, features); constant features are
    dropped and the rest centred, giving ``Xc = U diag(s) V^T``.

    Attributes:
        basis: (examples, k) orthonormal columns, the top-k left singular vectors
            of ``Xc``, by descending singular value. k is the numerical rank
            unless ``prepare`` was asked to truncate.
        singular_values: (rank,) every singular value of ``Xc`` above the rank
            tolerance, descending; truncation never removes any of these.
        loadings: (k, features kept) correlation of each basis column with each
            non-constant feature (``diag(s) V^T`` scaled by feature norms); PWCCA
            weights are built from it.
        num_features: Columns of the input, constant ones included.
        constant_features: Columns dropped because they have zero variance.
        max_sq_norm: Largest centred sum of squares of a feature; the scale of
            the ``epsilon`` ridge, as google/svcca rescales covariances.
        feature_means: (features kept,) mean of each non-constant feature;
            published PWCCA projects onto uncentred activations.
        feature_norms: (features kept,) centred norm of each non-constant
            feature (``loadings * feature_norms`` is ``diag(s) V^T``).
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    loadings: torch.Tensor
    num_features: int
    constant_features: int
    max_sq_norm: float
    feature_means: torch.Tensor
    feature_norms: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        return int(self.singular_values.shape[0])

    @property
    def directions(self) -> int:
        """Number of basis columns kept (k)."""
        return int(self.basis.shape[1])

    @property
    def varying_features(self) -> int:
        """Features with non-zero variance: google/svcca's neuron count for PWCCA's side."""
        return self.num_features - self.constant_features

    @property
    def truncated(self) -> bool:
        return self.directions < self.rank

    @property
    def device(self) -> torch.device:
        return self.basis.device

    def to(self, device: torch.device | str) -> PreparedRepresentation:
        """The same decomposition with every tensor on ``device`` (e.g. CPU to ship between processes)."""
        tensors = ("basis", "singular_values", "loadings", "feature_means", "feature_norms")
        return replace(self, **{name: getattr(self, name).to(device) for name in tensors})


Representation = Array | PreparedRepresentation
SimilarityFn = Callable[..., CCAResult | CKAResult]

SIMILARITIES: Registry[SimilarityFn] = Registry("similarity measure")


def get_similarity(name: str) -> SimilarityFn:
    """Return the similarity function registered as ``name``.

    Every registered function takes two (examples, features) representations and
    keyword-only options.

    Raises:
        ValueError: ``name`` is unknown; the message lists the valid names.
    """
    return SIMILARITIES.get(name)


def list_similarities() -> list[str]:
    """Names of the registered similarity measures, sorted."""
    return SIMILARITIES.names()


# --------------------------------------------------------------------------- inputs


def _as_float64(x: object, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        if x.dtype == object or not np.issubdtype(x.dtype, np.number):
            raise TypeError(f"{name} has dtype {x.dtype}; expected a numeric array")
        arr = np.asarray(x, dtype=np.float64)
        if not arr.flags.writeable or any(stride < 0 for stride in arr.strides):
            # torch.from_numpy rejects negative strides and warns on read-only
            # buffers (we never write to them).
            arr = arr.copy()
        t = torch.from_numpy(arr)
    else:
        raise TypeError(
            f"{name} must be a numpy array, a torch tensor or a PreparedRepresentation; got {type(x).__name__}"
        )
    if t.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (examples, features); got shape {tuple(t.shape)}."
            " Use flatten_conv for (N, C, H, W) feature maps."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)} (examples, features)")
    return t.to(torch.float64)


def _column_means(t: torch.Tensor, name: str) -> torch.Tensor:
    """Column means, which also detect non-finite input without another pass."""
    means = t.mean(dim=0, keepdim=True)
    if not bool(torch.isfinite(means).all()):
        raise ValueError(f"{name} contains NaN or infinite values (or values whose sum overflows float64)")
    return means


def _centred(t: torch.Tensor, name: str) -> torch.Tensor:
    return t - _column_means(t, name)


def _device_of(x: object) -> torch.device | None:
    if isinstance(x, torch.Tensor):
        return x.device
    if isinstance(x, PreparedRepresentation):
        return x.device
    return None


def _common_device(x: object, y: object) -> torch.device:
    dx, dy = _device_of(x), _device_of(y)
    if dx is not None and dy is not None and dx != dy:
        raise ValueError(f"x is on {dx} but y is on {dy}; move both to one device")
    return dx or dy or torch.device("cpu")


def _num_rows(x: object, name: str) -> int:
    if isinstance(x, PreparedRepresentation):
        return x.num_examples
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(
            f"{name} must be 2-D (examples, features); got shape {shape}."
            " Use flatten_conv for (N, C, H, W) feature maps."
        )
    return int(shape[0])


def _check_rows(x: object, y: object) -> None:
    nx, ny = _num_rows(x, "x"), _num_rows(y, "y")
    if nx == 0 or ny == 0:
        raise ValueError(f"empty representation: x has {nx} examples, y has {ny}")
    if nx != ny:
        raise ValueError(
            f"x has {nx} examples (rows) but y has {ny}; both must hold the same"
            " examples in the same order (layout: examples x features)"
        )


def _tensor_on(x: object, name: str, device: torch.device) -> torch.Tensor:
    return _as_float64(x, name).to(device)


def _check_epsilon(epsilon: float) -> None:
    if not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon!r}")


# ------------------------------------------------------------------- decomposition


def _num_directions(singular_values: torch.Tensor, *, keep: float, variance: str, dims: int | None) -> int:
    """How many leading singular directions the keep/variance/dims options select."""
    rank = int(singular_values.shape[0])
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or dims < 1:
            raise ValueError(f"dims must be a positive integer; got {dims!r}")
        if dims > rank:
            logger.debug("dims=%d exceeds the rank %d; keeping %d", dims, rank, rank)
        return min(int(dims), rank)
    if variance not in _VARIANCE_CHOICES:
        raise ValueError(f"variance must be one of {_VARIANCE_CHOICES}; got {variance!r}")
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"keep must be a fraction in (0, 1]; got {keep!r}")
    if keep >= 1.0:
        return rank
    s = singular_values.detach().cpu().numpy()
    weights = s**2 if variance == "squared" else s
    fraction = np.cumsum(weights) / weights.sum()
    # first k whose leading directions reach the fraction (google's sum_threshold)
    k = int(np.searchsorted(fraction, keep, side="left")) + 1
    return min(k, rank)


@contextlib.contextmanager
def _one_lapack_thread(device: torch.device) -> Iterator[None]:
    """Runs the enclosed CPU factorisations (eigh, SVD, QR of at most features x features) in one thread.

    Why: on a 2 048 x 2 048 matrix MKL's threaded LAPACK gains little, and on cores
    shared with other processes its OpenMP barriers spin: a 1 024 x 1 024 SVD took
    14.5 CPU s with 2 threads and 1.1 CPU s with 1 at load 20 (2-core EPYC). Ray
    analysis tasks already run with one thread; matrix products stay threaded.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _lower_gram(a: torch.Tensor, *, panel: int = 384) -> torch.Tensor:
    """``a^T a`` filled on and below the diagonal blocks only: eigh reads the lower triangle.

    Why: torch exposes no syrk; column panels below the diagonal do about 3/5 of
    a full matrix product for 2 048 columns. 384-wide panels measured 20 % faster
    than 256 or 512 (MKL, 2 AVX-512 cores, 20 000 x 2 048 float64).
    """
    cols = int(a.shape[1])
    if cols <= 2 * panel:
        return a.T @ a
    out = torch.zeros(cols, cols, dtype=a.dtype, device=a.device)
    for start in range(0, cols, panel):
        stop = min(start + panel, cols)
        out[start:, start:stop] = a[:, start:].T @ a[:, start:stop]
    return out


def _refine(xc: torch.Tensor, v: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accurate top-k SVD of ``xc`` restricted to span(v), by Cholesky-QR2 + SVD.

    Why: ``xc @ v / s`` from an eigendecomposition of ``xc^T xc`` is orthonormal
    only to about eps * (s_1/s_k)^2; the Gram of its columns, rescaled to unit
    diagonal, is near identity and can be factored to full accuracy.
    """
    y = xc @ v
    inv_col = 1.0 / torch.linalg.vector_norm(y, dim=0)
    g = (y.T @ y) * inv_col[:, None] * inv_col[None, :]
    lam, w = torch.linalg.eigh(g)
    # y = q @ r with q orthonormal: q = y D W lam^-1/2, r = lam^1/2 W^T D^-1
    to_q = (inv_col[:, None] * w) / lam.sqrt()[None, :]
    r = (lam.sqrt()[:, None] * w.T) / inv_col[None, :]
    p, sigma, zt = torch.linalg.svd(r)
    basis = y @ (to_q @ p)
    v_new = v @ zt.T
    loadings = (sigma[:, None] * v_new.T) / norms[None, :]
    return basis, sigma, loadings


def _prepare_tensor(
    t: torch.Tensor, *, keep: float, variance: str, dims: int | None, name: str = "x"
) -> PreparedRepresentation:
    n, p = t.shape
    if n < 2:
        raise ValueError(f"{name} needs at least 2 examples to centre; got shape {tuple(t.shape)}")
    means = _column_means(t, name)
    # Exact constancy test: centring a constant column leaves rounding noise, not 0.
    varying = (t != t[:1]).any(dim=0)
    q = int(varying.sum())
    if q == 0:
        raise ValueError(
            f"every one of the {p} features of {name} is constant over the {n} examples;"
            " similarity is undefined for a representation without variance"
        )
    if q < p:
        logger.debug("dropped %d constant features of %d", p - q, p)
    xc = t - means if q == p else t[:, varying] - means[:, varying]

    if q <= n:
        # Few features: eigh of the q x q covariance instead of an n x q SVD.
        gram = _lower_gram(xc)
        sq_norms = gram.diagonal().clone()
    else:
        # Few examples: the n x n Gram matrix is the small side.
        gram = _lower_gram(xc.T)
        sq_norms = xc.square().sum(dim=0)
    if not bool((sq_norms > 0).all()):
        raise ValueError(
            f"{name} has a non-constant feature whose variance underflows float64; rescale the activations"
        )
    norms = sq_norms.sqrt()
    with _one_lapack_thread(gram.device):
        lam, vecs = torch.linalg.eigh(gram)
    lam, vecs = lam.flip(0), vecs.flip(1)
    rank = int((lam > lam[0] * _RANK_RTOL * max(n, q)).sum())
    s = lam[:rank].sqrt()
    k = _num_directions(s, keep=keep, variance=variance, dims=dims)

    if q <= n:
        v = vecs[:, :k]
    else:
        v = (xc.T @ vecs[:, :k]) / s[:k][None, :]
    if float(s[k - 1]) < float(s[0]) * _REFINE_BELOW:
        # s keeps the first-pass values (accurate to ~sqrt(eps) s_1, ample for
        # variance fractions) so svcca re-selects exactly these k directions.
        basis, _, loadings = _refine(xc, v, norms)
    elif q <= n:
        basis = xc @ (v / s[:k][None, :])
        loadings = (s[:k, None] * v.T) / norms[None, :]
    else:
        basis = vecs[:, :k].contiguous()
        loadings = (s[:k, None] * v.T) / norms[None, :]
    return PreparedRepresentation(
        basis=basis,
        singular_values=s,
        loadings=loadings,
        num_features=int(p),
        constant_features=int(p - q),
        max_sq_norm=float((norms**2).max()),
        feature_means=(means[0] if q == p else means[0, varying]).clone(),
        feature_norms=norms,
    )


def prepare(
    x: Array,
    *,
    keep: float = 1.0,
    variance: Variance = "squared",
    dims: int | None = None,
) -> PreparedRepresentation:
    """Decompose one (examples, features) representation for reuse in comparisons.

    Drops zero-variance features, centres the rest and computes an orthonormal
    basis of the column space (thin SVD via the eigendecomposition of the smaller
    of the covariance and the Gram matrix, float64). Pass the result to
    :func:`cca`, :func:`svcca`, :func:`pwcca` or :func:`linear_cka` in place of
    the raw array; comparing all pairs of a grid then costs one decomposition per
    representation and one (k x k) product per pair.

    Args:
        x: Activations, (examples, features), numpy or torch; the result lives on
            the tensor's device (CPU for numpy).
        keep: Store only the leading directions explaining this fraction of the
            variance (1.0 keeps the full numerical rank). A truncated preparation
            serves :func:`svcca` with an equal or smaller ``keep``/``dims``; it
            saves memory -- the basis is examples x k float64.
        variance: ``"squared"`` measures variance by squared singular values;
            ``"mass"`` by singular values (google/svcca tutorial convention).
        dims: Store exactly this many leading directions (at most the rank);
            overrides ``keep``.

    Returns:
        The frozen :class:`PreparedRepresentation`.

    Raises:
        ValueError: ``x`` is not 2-D, empty, non-finite, has fewer than two
            examples, or has no varying feature; or an option is out of range.
    """
    t = _as_float64(x, "x")
    return _prepare_tensor(t, keep=keep, variance=variance, dims=dims)


def _prepared_pair(
    x: Representation,
    y: Representation,
    *,
    keep: float = 1.0,
    variance: str = "squared",
    dims: int | None = None,
) -> tuple[PreparedRepresentation, PreparedRepresentation]:
    _check_rows(x, y)
    device = _common_device(x, y)
    out = []
    for value, name in ((x, "x"), (y, "y")):
        if isinstance(value, PreparedRepresentation):
            out.append(value)
        else:
            t = _tensor_on(value, name, device)
            out.append(_prepare_tensor(t, keep=keep, variance=variance, dims=dims, name=name))
    return out[0], out[1]


def _require_full(p: PreparedRepresentation, name: str, measure: str) -> None:
    if p.truncated:
        raise ValueError(
            f"{name} was prepared with truncation ({p.directions} of {p.rank}"
            f" directions); {measure} needs the full basis: use prepare({name})"
            " with the default keep=1.0, or svcca for truncated comparisons"
        )


def _ridge_scale(s: torch.Tensor, epsilon: float, scale: float) -> torch.Tensor:
    """Per-direction factor of (C + epsilon I)^-1/2 C^1/2, C scaled to max entry 1."""
    return s / torch.sqrt(s**2 + epsilon * scale)


def _canonical(
    px: PreparedRepresentation,
    kx: int,
    py: PreparedRepresentation,
    ky: int,
    *,
    epsilon: float,
    scale_x: float,
    scale_y: float,
    with_directions: bool = False,
    cross: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Canonical correlations and, if asked, (x-side, y-side) singular vectors of the basis cross product.

    ``cross`` is ``px.basis.T @ py.basis`` when the caller has it: the bases are
    ordered by descending singular value, so every truncation is its leading block.
    """
    if cross is None:
        m = px.basis[:, :kx].T @ py.basis[:, :ky]
    else:
        m = cross[:kx, :ky]
    if epsilon > 0:
        dx = _ridge_scale(px.singular_values[:kx], epsilon, scale_x)
        dy = _ridge_scale(py.singular_values[:ky], epsilon, scale_y)
        m = dx[:, None] * m * dy[None, :]
    with _one_lapack_thread(m.device):
        if with_directions:
            a, rho, bt = torch.linalg.svd(m, full_matrices=False)
            directions = (a, bt.T)
        else:
            directions, rho = None, torch.linalg.svdvals(m)
    # Orthonormal bases bound every correlation by 1; rounding can overshoot.
    return rho.clamp(0.0, 1.0), directions


# ------------------------------------------------------------------------ measures


def _full_canonical(
    px: PreparedRepresentation,
    py: PreparedRepresentation,
    *,
    epsilon: float,
    measure: str,
    with_directions: bool = False,
    cross: torch.Tensor | None = None,
):
    """(rho, directions) on the full column spaces: what CCA and PWCCA share."""
    _check_epsilon(epsilon)
    _require_full(px, "x", measure)
    _require_full(py, "y", measure)
    return _canonical(
        px,
        px.directions,
        py,
        py.directions,
        epsilon=epsilon,
        scale_x=px.max_sq_norm,
        scale_y=py.max_sq_norm,
        with_directions=with_directions,
        cross=cross,
    )


@SIMILARITIES.register("cca")
def cca(x: Representation, y: Representation, *, epsilon: float = 0.0) -> CCAResult:
    """Mean canonical correlation between two (examples, features) representations.

    Constant features are dropped; the canonical correlations are the singular
    values of ``Ux^T Uy`` for orthonormal bases of the centred column spaces, so
    there are ``min(rank x, rank y)`` of them and rank-deficient inputs are
    handled without NaN. At ``epsilon=0`` this equals the mean of ``cca_coef1``
    of google/svcca ``get_cca_similarity`` on well-conditioned inputs.

    Args:
        x: (examples, features) numpy array or torch tensor, or the
            :func:`prepare` result of one (prepared without truncation).
        y: Same, on the same examples in the same order.
        epsilon: Ridge added to each covariance after scaling it so its largest
            entry is 1 (google/svcca's convention); 0 is exact CCA.

    Returns:
        :class:`CCAResult` with the mean and the sorted coefficients.

    Raises:
        ValueError: mismatched or empty rows, non-2-D or non-finite input, a
            representation with no variance, or a truncated preparation.
    """
    px, py = _prepared_pair(x, y)
    return _cca_core(px, py, epsilon=epsilon)


def _cca_core(
    px: PreparedRepresentation, py: PreparedRepresentation, *, cross: torch.Tensor | None = None, epsilon: float = 0.0
) -> CCAResult:
    rho, _ = _full_canonical(px, py, epsilon=epsilon, measure="cca", cross=cross)
    return CCAResult(score=float(rho.mean()), coefficients=rho.cpu().numpy())


@SIMILARITIES.register("svcca")
def svcca(
    x: Representation,
    y: Representation,
    *,
    keep: float = 0.99,
    variance: Variance = "squared",
    dims: int | None = None,
    epsilon: float = 0.0,
) -> SVCCAResult:
    """SVCCA: CCA between the top singular directions of two representations.

    Each (examples, features) representation is centred and reduced to its
    leading singular directions -- enough to explain ``keep`` of the variance, or
    exactly ``dims`` of them -- and the mean canonical correlation of the reduced
    representations is returned (Raghu et al. 2017). With ``dims=20`` and
    ``variance`` irrelevant this is google/svcca's tutorial pipeline.

    Args:
        x: (examples, features) array/tensor, or a :func:`prepare` result that
            holds at least the directions asked for.
        y: Same, on the same examples in the same order.
        keep: Fraction of variance to keep, in (0, 1]; 1.0 gives plain CCA.
        variance: ``"squared"`` (default) measures variance by squared singular
            values, the usual definition; ``"mass"`` by singular values, as the
            google/svcca tutorial does.
        dims: Keep exactly this many directions (fewer if the rank is lower);
            overrides ``keep``.
        epsilon: Ridge on the reduced covariances, as in :func:`cca`.

    Returns:
        :class:`SVCCAResult` with mean, coefficients and the dims kept.

    Raises:
        ValueError: input errors as in :func:`cca`, or a prepared representation
            that was truncated to fewer directions than asked for.
    """
    _check_epsilon(epsilon)
    px, py = _prepared_pair(x, y, keep=keep, variance=variance, dims=dims)
    return _svcca_core(px, py, keep=keep, variance=variance, dims=dims, epsilon=epsilon)


def _svcca_core(
    px: PreparedRepresentation,
    py: PreparedRepresentation,
    *,
    cross: torch.Tensor | None = None,
    keep: float = 0.99,
    variance: Variance = "squared",
    dims: int | None = None,
    epsilon: float = 0.0,
) -> SVCCAResult:
    _check_epsilon(epsilon)
    ks = []
    for p, name in ((px, "x"), (py, "y")):
        k = _num_directions(p.singular_values, keep=keep, variance=variance, dims=dims)
        if k > p.directions:
            raise ValueError(
                f"svcca needs {k} directions of {name} but its preparation kept"
                f" {p.directions}; prepare it with a larger keep/dims (or keep=1.0)"
            )
        ks.append(k)
    kx, ky = ks
    # The reduced representation's largest variance is its top singular value
    # squared: the scale google/svcca's rescaling gives the ridge.
    rho, _ = _canonical(
        px,
        kx,
        py,
        ky,
        epsilon=epsilon,
        scale_x=float(px.singular_values[0]) ** 2,
        scale_y=float(py.singular_values[0]) ** 2,
        cross=cross,
    )
    return SVCCAResult(score=float(rho.mean()), coefficients=rho.cpu().numpy(), dims=(kx, ky))


@SIMILARITIES.register("pwcca")
def pwcca(
    x: Representation,
    y: Representation,
    *,
    epsilon: float = 0.0,
    weighting: Weighting = "projection",
    centred: bool = True,
) -> PWCCAResult:
    """Projection-weighted CCA (Morcos et al. 2018) of two representations.

    Canonical correlations ``rho_i`` are computed as in :func:`cca`; the score
    is ``sum_i weight_i * rho_i`` with weights summing to 1.

    ``weighting="projection"`` (default) is the published weighting, as
    google/svcca ``compute_pwcca(x.T, y.T)`` computes it with the bug of its
    second branch fixed (it projects onto x where it means y): take the side
    with fewer non-constant features (x on a tie), form its canonical
    directions ``Xc u_i`` (u_i the left singular vectors of the whitened cross
    covariance, the google ``coef_x``), orthonormalise them in order (QR), and
    weight direction i by ``sum_j |<p_i, x_j>|`` over that side's non-constant
    features. Because the side is chosen by width, ``pwcca(x, y) == pwcca(y, x)``
    unless the widths tie.

    ``centred=True`` (default) projects onto the *centred* features. Flipping
    the sign of any singular vector then only flips the sign of its projections,
    so the value does not depend on the signs LAPACK returns, nor on the order or
    signs of the neurons; on centred input it equals google/svcca's value.

    ``centred=False`` is google/svcca's code on raw (uncentred) activations: it
    adds feature i's mean back to direction i and projects onto the uncentred
    features. That makes the weights depend on each direction's sign (and on
    which neuron is i), which google/svcca leaves to LAPACK: on one pair of ReLU
    layers its value ranged over 0.595-0.648 under random sign choices. Here the
    sign is fixed (the largest coefficient of each direction over the features is
    positive, sklearn's ``svd_flip``), which makes it reproducible, not meaningful.

    ``weighting="correlation"`` is this project's earlier variant: weight_i =
    ``sum_j |corr(h_i, x_j)|`` with h_i the canonical variates of x, always
    from the first argument (``centred`` does not apply: correlations are
    centred). It equals the published weights when x is centred, whitened and
    not wider than y.

    Args:
        x: (examples, features) array/tensor or untruncated :func:`prepare`
            result.
        y: Same, on the same examples in the same order.
        epsilon: Ridge, as in :func:`cca`.
        weighting: ``"projection"`` (published) or ``"correlation"``.
        centred: Project onto centred features (sign-free, default) or, with
            False, onto uncentred ones as google/svcca does (sign-fixed).

    Returns:
        :class:`PWCCAResult` with the weighted score, coefficients and weights.

    Raises:
        ValueError: input errors as in :func:`cca`, or an unknown weighting.
    """
    if weighting not in _WEIGHTING_CHOICES:
        raise ValueError(f"weighting must be one of {_WEIGHTING_CHOICES}; got {weighting!r}")
    px, py = _prepared_pair(x, y)
    return _pwcca_core(px, py, epsilon=epsilon, weighting=weighting, centred=centred)


def _pwcca_core(
    px: PreparedRepresentation,
    py: PreparedRepresentation,
    *,
    cross: torch.Tensor | None = None,
    epsilon: float = 0.0,
    weighting: Weighting = "projection",
    centred: bool = True,
) -> PWCCAResult:
    if weighting not in _WEIGHTING_CHOICES:
        raise ValueError(f"weighting must be one of {_WEIGHTING_CHOICES}; got {weighting!r}")
    if not isinstance(centred, bool):
        raise ValueError(f"centred must be True or False; got {centred!r}")
    rho, (a, b) = _full_canonical(px, py, epsilon=epsilon, measure="pwcca", with_directions=True, cross=cross)
    if weighting == "projection":
        if px.varying_features <= py.varying_features:
            weights = _projection_weights(px, a, centred=centred)
        else:
            weights = _projection_weights(py, b, centred=centred)
    else:
        if epsilon > 0:
            # The ridge reweights basis directions; the variate is basis @ (d * a).
            a = a * _ridge_scale(px.singular_values, epsilon, px.max_sq_norm)[:, None]
        a = a / torch.linalg.vector_norm(a, dim=0, keepdim=True)
        correlations = a.T @ px.loadings  # (directions, features)
        weights = correlations.abs().sum(dim=1)
    weights = weights / weights.sum()
    return PWCCAResult(
        score=float((weights * rho).sum()),
        coefficients=rho.cpu().numpy(),
        weights=weights.cpu().numpy(),
    )


def _projection_weights(p: PreparedRepresentation, directions: torch.Tensor, *, centred: bool) -> torch.Tensor:
    """Unnormalised published PWCCA weights of one side, without an examples-sized QR.

    The canonical directions ``U diag(s) A`` and the centred features
    ``U diag(s) V^T`` lie in the span of the orthonormal columns U, so
    orthonormalising and projecting in those k coordinates gives the same inner
    products as doing it over the n examples. Uncentred, directions and features
    gain ``1 mu^T``: U is centred, hence orthogonal to the constant vector, and
    ``[U, 1/sqrt(n)]`` is an orthonormal basis of (k + 1) coordinates.
    """
    k, r = directions.shape
    # diag(s) V^T; its row norms are s exactly, also on the refined (ill-conditioned) path.
    scaled_vt = p.loadings * p.feature_norms[None, :]
    s = torch.linalg.vector_norm(scaled_vt, dim=1)
    direction_coords = s[:, None] * directions
    feature_coords = scaled_vt
    if not centred:
        root_n = math.sqrt(p.num_examples)
        means = p.feature_means.to(directions.dtype)
        # Adding feature i's mean to direction i makes the weights depend on each
        # direction's sign, which google/svcca leaves to LAPACK. Fix it: the largest
        # coefficient of each direction over the features (google's coef_x row) is
        # positive, sklearn's svd_flip convention.
        coefficients = (scaled_vt / s[:, None]).T @ directions  # (features, r)
        largest = coefficients.abs().argmax(dim=0)
        signs = torch.sign(coefficients[largest, torch.arange(r, device=directions.device)])
        direction_coords = direction_coords * torch.where(signs == 0, torch.ones_like(signs), signs)[None, :]
        direction_coords = torch.cat([direction_coords, root_n * means[None, :r]])
        feature_coords = torch.cat([scaled_vt, root_n * means[None, :]])
    with _one_lapack_thread(directions.device):
        q, _ = torch.linalg.qr(direction_coords)
    return (q.T @ feature_coords).abs().sum(dim=1)


# -------------------------------------------------------------------- chance level

_PREPARABLE = ("cca", "svcca", "pwcca", "linear_cka")


@dataclass(frozen=True, eq=False)
class ChanceLevel:
    """What a measure scores on unrelated pairs of representations of these shapes.

    Attributes:
        mean: Mean score over the permuted repeats.
        std: Standard deviation over the repeats (ddof 0).
        scores: The score of each repeat.
        measure: Registered name of the measure.
        grouped: Whether whole groups (images) were permuted together.
    """

    mean: float
    std: float
    scores: tuple[float, ...]
    measure: str
    grouped: bool


def _derangement(count: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn single cycle: ``out[i] != i`` for every i, so no row keeps its partner."""
    order = rng.permutation(count)
    out = np.empty(count, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


def _position_keys(positions: np.ndarray) -> np.ndarray:
    """One integer per row for a (rows,) or (rows, d) array of non-negative position labels."""
    if positions.ndim == 1:
        return positions.astype(np.int64)
    _, keys = np.unique(positions, axis=0, return_inverse=True)
    return keys.reshape(-1).astype(np.int64)


def _broken_correspondence(
    rows: int, groups: np.ndarray | None, rng: np.random.Generator, positions: np.ndarray | None = None
) -> np.ndarray:
    """Row order of y against x's rows: rows deranged, or whole groups deranged.

    With groups, the groups are laid out one after another in a seeded random
    cycle (each group's rows by position when ``positions`` is given, else in row
    order) and every row is paired with the row ``m`` places further round the
    cycle, m the size of the largest group. A group spans at most m places, so no
    row meets a row of its own group (given every group holds at most half the
    rows). With equal group sizes this pairs each group with the next one in the
    cycle, row k with row k -- with ``positions`` (every group holding the same
    positions) the row at the same position.
    """
    if groups is None:
        return _derangement(rows, rng)
    labels, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse)
    largest = int(sizes.max())
    if 2 * largest > rows:
        raise ValueError(
            f"group {labels[int(sizes.argmax())]!r} holds {largest} of the {rows} rows; pairing every row with a"
            " row of another group needs each group to hold at most half of them"
        )
    within = np.arange(rows) if positions is None else _position_keys(positions)
    # Sorted by group, then position (or row index): each group's rows in a fixed order.
    by_group = np.lexsort((within, inverse))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    cycle = rng.permutation(len(labels))
    layout = np.concatenate([by_group[starts[g] : starts[g + 1]] for g in cycle])
    order = np.empty(rows, dtype=np.int64)
    order[layout] = np.roll(layout, -largest)
    return order


def _check_positions(labels: np.ndarray, positions: np.ndarray, rows: int) -> None:
    """Every group must hold the same set of positions, so each row has a same-position partner."""
    if positions.shape[:1] != (rows,) or positions.ndim not in (1, 2):
        raise ValueError(
            f"positions must hold one position per row: shape ({rows},) or ({rows}, d); got {positions.shape}"
        )
    keys = _position_keys(positions)
    order = np.lexsort((keys, labels))
    _, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse)
    if np.any(sizes != sizes[0]):
        raise ValueError(
            f"groups sample different positions (group sizes {sizes.min()} to {sizes.max()}); same-position"
            " pairing needs every image at the same positions: a probe stored before probes shared positions?"
        )
    per_group = keys[order].reshape(len(sizes), sizes[0])
    if np.any(per_group != per_group[:1]):
        raise ValueError(
            "groups sample different positions; same-position pairing needs every image at the same positions:"
            " a probe stored before probes shared positions?"
        )


def _permuted_rows(value: Representation, order: np.ndarray) -> Representation:
    if isinstance(value, PreparedRepresentation):
        # Centring, singular values and loadings do not change when rows are permuted.
        return replace(value, basis=value.basis[torch.from_numpy(order).to(value.device)])
    if isinstance(value, torch.Tensor):
        return value[torch.from_numpy(order).to(value.device)]
    return value[order]


def _decomposed(value: Representation, name: str, device: torch.device) -> PreparedRepresentation:
    if isinstance(value, PreparedRepresentation):
        return value
    return _prepare_tensor(_tensor_on(value, name, device), keep=1.0, variance="squared", dims=None, name=name)


def _chance_inputs(
    x: Representation, y: Representation, repeats: int, groups: Array | None, positions: Array | None
) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """Validated (rows, group labels, positions) of a chance level."""
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer; got {repeats!r}")
    _check_rows(x, y)
    rows = _num_rows(x, "x")
    labels = None
    if groups is not None:
        labels = groups.cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
        if labels.shape != (rows,):
            raise ValueError(f"groups must hold one label per row: shape ({rows},); got {labels.shape}")
        if len(np.unique(labels)) < 2:
            raise ValueError("groups has a single label; permuting whole groups needs at least two")
    where = None
    if positions is not None:
        if labels is None:
            raise ValueError("positions need groups: a row keeps its position in another group (image)")
        where = positions.cpu().numpy() if isinstance(positions, torch.Tensor) else np.asarray(positions)
        _check_positions(labels, where, rows)
    return rows, labels, where


def _chance(scores: tuple[float, ...], measure: str, grouped: bool) -> ChanceLevel:
    return ChanceLevel(
        mean=float(np.mean(scores)), std=float(np.std(scores)), scores=scores, measure=measure, grouped=grouped
    )


def chance_level(
    x: Representation,
    y: Representation,
    *,
    measure: str = "svcca",
    repeats: int = 5,
    seed: int = 0,
    groups: Array | None = None,
    positions: Array | None = None,
    options: dict | None = None,
) -> ChanceLevel:
    """The measure on pairs whose row correspondence is broken: its floor for these shapes.

    Each repeat pairs the rows of ``x`` with a seeded derangement of the rows of
    ``y`` (no row keeps its partner) and scores the pair with the registered
    ``measure``.

    With ``groups`` (one label per row, e.g. the image a sampled (image, position)
    row came from) it is a derangement of *images*: no row is ever paired with a
    row of its own image, so spatial correlation within an image cannot leak into
    the floor. The images are put in a seeded random cycle and each one's rows
    are paired with the next image's; with unequal group sizes the pairing runs
    on round the cycle, so an image's rows can meet two neighbours but never
    itself (no group may hold more than half the rows).

    With ``positions`` too (one (h, w) per row) every row is paired with the row
    at the *same position* in another image, so the floor measures content only
    and keeps all of the position alignment, the same for every layer. Every
    image must then hold the same set of positions, which
    :func:`transfusion.probes.sample_positions` guarantees; otherwise a
    ValueError says so. Without positions each image's rows are paired in order.

    Raw inputs of the CCA family and linear CKA are decomposed once
    (:func:`prepare`) and only the basis rows of y are permuted per repeat;
    prepared inputs are reused as they are. :func:`similarities_with_chance`
    gives the same numbers for several measures at once, sharing the work.

    Args:
        x: (examples, features) array/tensor, or a prepared representation.
        y: Same, on the same examples in the same order.
        measure: A registered similarity name (:func:`list_similarities`).
        repeats: Number of permutations, >= 1.
        seed: Seed of the permutations.
        groups: Optional (examples,) labels; needs at least two distinct labels.
        positions: Optional (examples,) or (examples, d) position of each row
            within its group; needs ``groups``.
        options: Keyword options passed to the measure (e.g. ``{"keep": 0.99}``).

    Returns:
        :class:`ChanceLevel` with mean and std over the repeats.

    Raises:
        ValueError: unknown measure, repeats < 1, groups or positions of the
            wrong length, a single label, a group of more than half the rows,
            groups at different positions, or the measure's own input errors.
    """
    fn = get_similarity(measure)
    rows, labels, where = _chance_inputs(x, y, repeats, groups, positions)
    options = dict(options or {})
    if measure in _PREPARABLE and options.get("method", "auto") == "auto":
        device = _common_device(x, y)
        x, y = _decomposed(x, "x", device), _decomposed(y, "y", device)
    rng = np.random.default_rng(seed)
    scores = tuple(
        float(fn(x, _permuted_rows(y, _broken_correspondence(rows, labels, rng, where)), **options).score)
        for _ in range(int(repeats))
    )
    return _chance(scores, measure, labels is not None)


@dataclass(frozen=True, eq=False)
class ScoreWithChance:
    """One measure of a pair and its chance level.

    Attributes:
        result: What the measure returns on the pair.
        chance: Its :func:`chance_level` on the same pair.
    """

    result: CCAResult | CKAResult
    chance: ChanceLevel


def similarities_with_chance(
    x: Representation,
    y: Representation,
    *,
    measures: tuple[str, ...],
    options: Mapping[str, dict] | None = None,
    repeats: int = 5,
    seed: int = 0,
    groups: Array | None = None,
    positions: Array | None = None,
) -> dict[str, ScoreWithChance]:
    """Each measure of a pair with its chance level: the values of separate calls, computed once.

    Equals ``get_similarity(m)(x, y, **options[m])`` and ``chance_level(x, y,
    measure=m, repeats=..., seed=..., groups=..., positions=..., options=options[m])``
    for every m, to rounding. Every chance level of one seed uses the same
    permutations, so for CCA, SVCCA, PWCCA and linear CKA each pair and each
    permutation needs one examples-sized product ``Ux^T P Uy`` -- SVCCA's is its
    leading block -- instead of one per measure. Other measures (``rbf_cka``, a
    ``method`` option) are computed separately.

    Args:
        x: (examples, features) array/tensor, or an untruncated prepared representation.
        y: Same, on the same examples in the same order.
        measures: Registered similarity names.
        options: Keyword options of each measure, by name (e.g. ``{"svcca": {"keep": 0.99}}``).
        repeats, seed, groups, positions: As in :func:`chance_level`.

    Returns:
        ``{measure: ScoreWithChance}`` in the order of ``measures``.

    Raises:
        ValueError: as :func:`chance_level` and the measures do.
    """
    options = {m: dict((options or {}).get(m, {})) for m in measures}
    for measure in measures:
        get_similarity(measure)
    rows, labels, where = _chance_inputs(x, y, repeats, groups, positions)
    # The measures computed from the basis cross product Ux^T Uy of two full preparations.
    cores = {"cca": _cca_core, "svcca": _svcca_core, "pwcca": _pwcca_core, "linear_cka": _linear_cka_core}
    shared = [m for m in measures if m in cores and "method" not in options[m]]
    out: dict[str, ScoreWithChance] = {}
    if shared:
        device = _common_device(x, y)
        px, py = _decomposed(x, "x", device), _decomposed(y, "y", device)
        if px.truncated or py.truncated:
            shared = []
    if shared:
        # The permutations chance_level draws for each measure from the same seed.
        rng = np.random.default_rng(seed)
        orders = [_broken_correspondence(rows, labels, rng, where) for _ in range(int(repeats))]
        cross = px.basis.T @ py.basis
        results = {m: cores[m](px, py, cross=cross, **options[m]) for m in shared}
        permuted: dict[str, list[float]] = {m: [] for m in shared}
        for order in orders:
            qy = _permuted_rows(py, order)
            cross = px.basis.T @ qy.basis
            for m in shared:
                permuted[m].append(float(cores[m](px, qy, cross=cross, **options[m]).score))
        for m in shared:
            out[m] = ScoreWithChance(results[m], _chance(tuple(permuted[m]), m, labels is not None))
    for m in measures:
        if m not in out:
            result = get_similarity(m)(x, y, **options[m])
            chance = chance_level(
                x, y, measure=m, repeats=repeats, seed=seed, groups=groups, positions=positions, options=options[m]
            )
            out[m] = ScoreWithChance(result, chance)
    return {m: out[m] for m in measures}


def _centred_pair(x: object, y: object) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rows(x, y)
    device = _common_device(x, y)
    return _centred(_tensor_on(x, "x", device), "x"), _centred(_tensor_on(y, "y", device), "y")


def _alignment(hsic: torch.Tensor, norm_x: torch.Tensor, norm_y: torch.Tensor) -> float:
    denominator = float(norm_x * norm_y)
    if denominator == 0.0:
        raise ValueError("a representation has zero variance (every feature constant); CKA is undefined")
    return float(hsic) / denominator


def _centre_gram(gram: torch.Tensor) -> torch.Tensor:
    """H K H with H the centring matrix, without forming H."""
    row = gram.mean(dim=0)
    return gram - row[:, None] - row[None, :] + row.mean()


@SIMILARITIES.register("linear_cka")
def linear_cka(
    x: Representation,
    y: Representation,
    *,
    method: Literal["auto", "gram", "features"] = "auto",
) -> CKAResult:
    """Linear CKA (Kornblith et al. 2019) between two (examples, features) arrays.

    Two equal formulations: from examples, ``HSIC(K, L) / sqrt(HSIC(K, K)
    HSIC(L, L))`` with linear Gram matrices ``K = Xc Xc^T``; from features,
    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``. ``"auto"`` uses the
    feature form when both have fewer features than examples (it is then
    cheaper) and the Gram form otherwise. Untruncated :func:`prepare` results
    are accepted too (computed from their SVDs; ``method`` must be ``"auto"``).

    Args:
        x: (examples, features) array/tensor or untruncated prepared representation.
        y: Same, on the same examples in the same order.
        method: ``"auto"``, ``"gram"`` or ``"features"``.

    Returns:
        :class:`CKAResult`.

    Raises:
        ValueError: input errors as in :func:`cca`, an unknown method, or a
            representation with zero variance.
    """
    if method not in _CKA_METHODS:
        raise ValueError(f"method must be one of {_CKA_METHODS}; got {method!r}")
    if isinstance(x, PreparedRepresentation) or isinstance(y, PreparedRepresentation):
        if method != "auto":
            raise ValueError(
                f"method={method!r} needs raw activations; prepared representations"
                " are compared through their SVDs (method='auto')"
            )
        px, py = _prepared_pair(x, y)
        return _linear_cka_core(px, py)
    xc, yc = _centred_pair(x, y)
    n = xc.shape[0]
    if method == "auto":
        method = "features" if max(xc.shape[1], yc.shape[1]) < n else "gram"
    if method == "features":
        hsic = (yc.T @ xc).square().sum()
        return CKAResult(
            score=_alignment(hsic, torch.linalg.matrix_norm(xc.T @ xc), torch.linalg.matrix_norm(yc.T @ yc))
        )
    # Centring the features first is H K H for a linear kernel, with less
    # cancellation than centring the Gram matrix of raw features.
    gx, gy = xc @ xc.T, yc @ yc.T
    return CKAResult(score=_alignment((gx * gy).sum(), torch.linalg.matrix_norm(gx), torch.linalg.matrix_norm(gy)))


def _linear_cka_core(
    px: PreparedRepresentation, py: PreparedRepresentation, *, cross: torch.Tensor | None = None
) -> CKAResult:
    _require_full(px, "x", "linear_cka")
    _require_full(py, "y", "linear_cka")
    sx, sy = px.singular_values, py.singular_values
    if cross is None:
        cross = px.basis.T @ py.basis
    # Xc^T Yc = Vx Sx (Ux^T Uy) Sy Vy^T and Vx, Vy are orthonormal.
    scaled = sx[:, None] * cross * sy[None, :]
    return CKAResult(
        score=_alignment((scaled**2).sum(), torch.linalg.vector_norm(sx**2), torch.linalg.vector_norm(sy**2))
    )


def _median(values: torch.Tensor) -> torch.Tensor:
    """Median as numpy defines it: the mean of the two middle values for even counts."""
    flat = values.reshape(-1)
    count = flat.numel()
    upper = flat.kthvalue(count // 2 + 1).values
    if count % 2:
        return upper
    return (flat.kthvalue(count // 2).values + upper) / 2


def _rbf_gram(x: torch.Tensor, threshold: float) -> torch.Tensor:
    dots = x @ x.T
    sq_norms = dots.diagonal()
    # Rounding can make a distance slightly negative; distances are >= 0.
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * dots).clamp_min(0.0)
    # Kornblith's heuristic: bandwidth = threshold * median distance, the median
    # taken over all n^2 entries (diagonal included) as in their demo.
    sq_median = _median(sq_dist)
    if float(sq_median) <= 0.0:
        raise ValueError(
            "median pairwise distance is 0 (most examples coincide); the RBF"
            " bandwidth is undefined -- deduplicate examples or use linear_cka"
        )
    return torch.exp(-sq_dist / (2 * threshold**2 * sq_median))


@SIMILARITIES.register("rbf_cka")
def rbf_cka(x: Array, y: Array, *, threshold: float = 1.0) -> CKAResult:
    """RBF-kernel CKA (Kornblith et al. 2019) between two (examples, features) arrays.

    Kernel ``exp(-d^2 / (2 sigma^2))`` with ``sigma = threshold * median
    distance`` between examples (median over the full distance matrix, as in the
    authors' demo), Gram matrices centred, then ``HSIC(K, L) / sqrt(HSIC(K, K)
    HSIC(L, L))``. Memory and time are quadratic in the number of examples.

    Args:
        x: (examples, features) numpy array or torch tensor.
        y: Same, on the same examples in the same order.
        threshold: Bandwidth as a fraction of the median distance, > 0.

    Returns:
        :class:`CKAResult`.

    Raises:
        ValueError: input errors as in :func:`cca`, threshold <= 0, or a zero
            median distance.
    """
    if isinstance(x, PreparedRepresentation) or isinstance(y, PreparedRepresentation):
        raise ValueError("rbf_cka needs raw activations, not a PreparedRepresentation")
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a finite number > 0; got {threshold!r}")
    # Distances do not change under centring, and centred dot products cancel less.
    xc, yc = _centred_pair(x, y)
    gx = _centre_gram(_rbf_gram(xc, threshold))
    gy = _centre_gram(_rbf_gram(yc, threshold))
    return CKAResult(score=_alignment((gx * gy).sum(), torch.linalg.matrix_norm(gx), torch.linalg.matrix_norm(gy)))


# --------------------------------------------------------------------- conv layers


def flatten_conv(
    act: Array,
    *,
    method: Literal["examples", "pool", "subsample"] = "examples",
    max_examples: int | None = None,
    seed: int = 0,
) -> Array:
    """Turn conv activations (N, C, H, W) into a 2-D (examples, C) representation.

    Channels are the features. ``"examples"`` makes every spatial position of
    every image an example: (N*H*W, C), rows ordered image-major then h, then w.
    ``"pool"`` averages over positions: (N, C). ``"subsample"`` keeps a seeded
    random subset of at most ``max_examples`` of the N*H*W position rows, in
    their original order; two maps of the same (N, H, W) flattened with the same
    seed keep the same positions, so their rows still correspond. 2-D input is
    returned unchanged. The output is of the input's type (numpy or torch).

    Args:
        act: (N, C, H, W) or already 2-D (examples, features) activations.
        method: ``"examples"``, ``"pool"`` or ``"subsample"``.
        max_examples: Row budget for ``"subsample"`` (required there, and only
            accepted there).
        seed: Seed of the subsample.

    Returns:
        A 2-D (examples, C) array or tensor.

    Raises:
        ValueError: unknown method, input neither 2-D nor 4-D, or a missing /
            misplaced / non-positive ``max_examples``.
        TypeError: ``act`` is neither a numpy array nor a torch tensor.
    """
    if not isinstance(act, (np.ndarray, torch.Tensor)):
        raise TypeError(f"act must be a numpy array or torch tensor; got {type(act).__name__}")
    if method not in _FLATTEN_METHODS:
        raise ValueError(f"method must be one of {_FLATTEN_METHODS}; got {method!r}")
    if method == "subsample":
        if max_examples is None:
            raise ValueError("method='subsample' needs max_examples (a row budget)")
        if isinstance(max_examples, bool) or int(max_examples) != max_examples or max_examples < 1:
            raise ValueError(f"max_examples must be a positive integer; got {max_examples!r}")
    elif max_examples is not None:
        raise ValueError(f"max_examples only applies to method='subsample'; got method={method!r}")
    if act.ndim == 2:
        return act
    if act.ndim != 4:
        raise ValueError(f"act must be (N, C, H, W) or 2-D (examples, features); got shape {tuple(act.shape)}")
    n, c, h, w = act.shape
    is_torch = isinstance(act, torch.Tensor)
    if method == "pool":
        return act.mean(dim=(2, 3)) if is_torch else act.mean(axis=(2, 3))
    rows = act.permute(0, 2, 3, 1).reshape(n * h * w, c) if is_torch else np.moveaxis(act, 1, -1).reshape(n * h * w, c)
    if method == "examples" or n * h * w <= max_examples:
        return rows
    chosen = np.sort(np.random.default_rng(seed).choice(n * h * w, size=int(max_examples), replace=False))
    if is_torch:
        return rows[torch.from_numpy(chosen).to(act.device)]
    return rows[chosen]
