"""SVCCA speed: transfusion.similarity.svcca vs google/svcca's tutorial pipeline.

Two correlated float64 representations of 20 000 examples x 2 048 features
(layout examples x features) are compared with SVCCA keeping 99 % of the
variance (squared singular values). The baseline is our own numpy rendering of
the google/svcca tutorial: centre, thin ``np.linalg.svd`` of the whole
activation matrix, keep the top directions, then ``cca_core``-style CCA (joint
``np.cov``, rescale, pseudo-inverse, eigh square root, SVD) at epsilon 0.

Run from the repository root (takes about a minute on 2 cores)::

    python tests/benchmarks/bench_similarity.py

It prints the timings and appends (or replaces) the "## Similarity" section of
BENCHMARKS.md; ``--no-write`` skips that. Not collected by pytest (no test_
functions); pytest deselects the ``benchmark`` marker by default anyway.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from transfusion.similarity import prepare, svcca

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.common import cpu_model, write_section  # noqa: E402

SECTION = "## Similarity"
COMMAND = "python tests/benchmarks/bench_similarity.py"


def make_pair(examples: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared latent with a power-law spectrum; y = 0.8 shared + 0.6 own, each rotated."""
    rng = np.random.default_rng(seed)
    decay = np.arange(1, features + 1, dtype=np.float64) ** -0.75
    shared = rng.standard_normal((examples, features)) * decay
    own = rng.standard_normal((examples, features)) * decay

    def rotation() -> torch.Tensor:
        gaussian = torch.from_numpy(rng.standard_normal((features, features)))
        return torch.linalg.qr(gaussian).Q

    x = (torch.from_numpy(shared) @ rotation()).numpy()
    y = (torch.from_numpy(0.8 * shared + 0.6 * own) @ rotation()).numpy()
    return x, y


def _tutorial_reduce(acts: np.ndarray, keep: float) -> np.ndarray:
    """google tutorial step 1, neurons x datapoints: centre, thin SVD, diag(s_k) V_k.

    Kept operation for operation as the tutorial runs them (full thin SVD with
    U, a dense diagonal matrix product), only the number of directions comes
    from ``keep`` instead of a fixed 20.
    """
    centred = acts - acts.mean(axis=1, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    explained = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(explained, keep)) + 1
    return np.dot(s[:k] * np.eye(k), vt[:k])


def _cca_core_mean(a: np.ndarray, b: np.ndarray) -> float:
    """google cca_core step 2 at epsilon 0: whiten each covariance block, SVD."""
    na = a.shape[0]
    cov = np.cov(a, b)
    saa, sab, sbb = cov[:na, :na], cov[:na, na:], cov[na:, na:]
    # cca_core rescales each block by its largest entry before inverting
    amax, bmax = np.max(np.abs(saa)), np.max(np.abs(sbb))
    saa, sbb, sab = saa / amax, sbb / bmax, sab / np.sqrt(amax * bmax)

    def inverse_sqrt(block: np.ndarray) -> np.ndarray:
        # pseudo-inverse, then its square root through eigh and two dense products
        w, v = np.linalg.eigh(np.linalg.pinv(block))
        return np.dot(v, np.dot(np.diag(np.sqrt(w)), v.T))

    whitened = np.dot(inverse_sqrt(saa), np.dot(sab, inverse_sqrt(sbb)))
    _, rho, _ = np.linalg.svd(whitened)  # cca_core keeps the singular vectors too
    return float(np.mean(np.abs(rho)))


def baseline_svcca(x: np.ndarray, y: np.ndarray, keep: float) -> tuple[float, tuple[int, int]]:
    """The tutorial pipeline in google's layout (neurons x datapoints)."""
    a, b = _tutorial_reduce(x.T, keep), _tutorial_reduce(y.T, keep)
    return _cca_core_mean(a, b), (a.shape[0], b.shape[0])


def _timed(fn, *args, **kwargs):
    """Result, wall seconds and CPU seconds of this process (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def _busy_cpu_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine so far (Linux), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _numpy_blas() -> str:
    try:
        return np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:  # noqa: BLE001 -- informational only; layout differs across numpy
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=2_048)
    parser.add_argument("--keep", type=float, default=0.99)
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    busy_before, own_before, wall_before = (
        _busy_cpu_seconds(),
        time.process_time(),
        time.perf_counter(),
    )
    x, y = make_pair(args.examples, args.features, args.seed)
    # warm both pipelines up (library loading, thread pools) outside the timings
    svcca(x[:500, :50], y[:500, :50], keep=args.keep)
    baseline_svcca(x[:500, :50], y[:500, :50], args.keep)

    ours_times = []
    for _ in range(args.repeats):
        ours, seconds = _timed(svcca, x, y, keep=args.keep)
        ours_times.append(seconds)
    ours_seconds = tuple(statistics.median(t[i] for t in ours_times) for i in (0, 1))

    px, prepare_x_seconds = _timed(prepare, x, keep=args.keep)
    py, prepare_y_seconds = _timed(prepare, y, keep=args.keep)
    prepared, pair_seconds = _timed(svcca, px, py, keep=args.keep)
    prepare_seconds = tuple(a + b for a, b in zip(prepare_x_seconds, prepare_y_seconds, strict=True))

    (base_score, base_dims), base_seconds = _timed(baseline_svcca, x, y, args.keep)
    load_after = os.getloadavg()[0]
    busy_after = _busy_cpu_seconds()
    others = "unknown"
    if busy_before is not None and busy_after is not None:
        # CPU share taken by other processes while we ran: the timings' noise floor
        own = time.process_time() - own_before
        capacity = (time.perf_counter() - wall_before) * (os.cpu_count() or 1)
        others = f"{max(0.0, busy_after - busy_before - own) / capacity:.0%}"

    difference = abs(ours.score - base_score)
    speedup = base_seconds[0] / ours_seconds[0]
    cpu_speedup = base_seconds[1] / ours_seconds[1]
    rows = [
        ("baseline: our numpy rendering of the google/svcca tutorial (SVD + cca_core-style CCA)", base_seconds),
        (f"`svcca(x, y, keep={args.keep})` on raw arrays (median of {args.repeats})", ours_seconds),
        ("`prepare(x)` + `prepare(y)` (once per representation)", prepare_seconds),
        ("`svcca(px, py)` on prepared representations (per pair)", pair_seconds),
    ]
    print(f"examples x features: {args.examples} x {args.features}, keep {args.keep}")
    print("     wall       CPU")
    for name, (wall, cpu) in rows:
        print(f"{wall:8.2f} s {cpu:8.2f} s  {name}")
    print(f"speed-up (baseline / ours raw): {speedup:.1f}x wall, {cpu_speedup:.1f}x CPU")
    print(f"dims kept: ours {ours.dims}, baseline {base_dims}")
    print(f"scores: ours {ours.score:.12f}, baseline {base_score:.12f}, |diff| {difference:.2e}")
    print(f"prepared-pair score |diff| vs raw: {abs(prepared.score - ours.score):.2e}")
    print(f"load average {load_before:.1f} -> {load_after:.1f}; other processes used {others} of CPU")

    table = "\n".join(f"| {name} | {wall:.2f} | {cpu:.2f} |" for name, (wall, cpu) in rows)
    markdown = f"""{SECTION}

SVCCA (keep {args.keep:.0%} of variance, squared singular values) of two correlated
float64 representations, {args.examples} examples x {args.features} features
(shared power-law latent, see `make_pair`).

- Date: {dt.date.today().isoformat()}
- Command: `{COMMAND}`
- Machine: `nproc` {os.cpu_count()}, {cpu_model()}; load average {load_before:.1f}
  before / {load_after:.1f} after; other processes used {others} of the CPUs during the run
- Versions: torch {torch.__version__} (MKL: {torch.backends.mkl.is_available()}),
  numpy {np.__version__} (BLAS: {_numpy_blas()}), Python {platform.python_version()}

| pipeline | wall s | CPU s |
| --- | ---: | ---: |
{table}

- Speed-up, baseline (our rendering of the tutorial pipeline) / ours on raw arrays: **{speedup:.1f}x** wall clock
  ({cpu_speedup:.1f}x in CPU time, which other jobs on the machine disturb less)
- Directions kept: ours {ours.dims}, baseline {base_dims}
- Scores: ours {ours.score:.12f}, baseline {base_score:.12f}, |difference| {difference:.1e}
- Ours eigendecomposes the 2 048 x 2 048 covariance (torch, MKL) instead of an SVD of
  the 20 000-row matrix and never inverts a covariance. Part of the gap is MKL (torch)
  against OpenBLAS (this numpy build); google's code on an MKL-linked numpy would gain that part.
"""
    if not args.no_write:
        write_section(SECTION.removeprefix("## "), markdown.removeprefix(SECTION))
        print(f"wrote {SECTION!r} to {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
