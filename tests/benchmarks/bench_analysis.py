"""Representation analysis at full-grid shape: decompositions counted, CPU seconds per decomposition and in total.

The grid is the paper's: 6 models x 3 inits (random, ImageNet, Mean-Var) x 3 seeds, one
data size, probes at init and at the end of training. Every analysed layer has the
shape training now stores at the ``full-grid`` preset (587 px, 256 probe images,
10 (image, position) rows per channel: ResNet-50 / Inception-v3 stage 4 is
20 480 x 2 048). The analysis is planned by the real code (Figures 2 and 4 and the
seed table through :class:`RepresentationCache`), so the decomposition count is the
one an analysis of such a grid performs; it must equal the number of representations.

Running every decomposition and pair of that grid on 2 shared cores would take hours,
so the executor here computes the first decomposition of each distinct (rows, dims)
and the first pair of each (shape, measures) for real, on synthetic fp16 activations
(power-law spectrum, correlated pairs), and projects the rest from those CPU seconds.
It says which numbers are measured and which projected.

Run from the repository root::

    python tests/benchmarks/bench_analysis.py            # writes the BENCHMARKS.md section
    python tests/benchmarks/bench_analysis.py --quick --no-write   # dry run, small shapes
    python tests/benchmarks/bench_analysis.py --pair 10240x1024    # one Figure 2 pair, CPU s
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.common import machine_info, write_section  # noqa: E402
from transfusion.analysis.records import JobRecord  # noqa: E402
from transfusion.analysis.representations import (  # noqa: E402
    AnalysisSettings,
    Decomposition,
    PairScores,
    RepresentationCache,
    compare_decompositions,
    decompose_representation,
    seed_similarity_requests,
)
from transfusion.analysis.similarity_figures import figure2_requests, figure4_requests  # noqa: E402
from transfusion.config import GridSpec  # noqa: E402
from transfusion.presets import PAPER_INITS, PAPER_MODELS, PRESETS  # noqa: E402
from transfusion.probes import ProbeSampling, probe_plan  # noqa: E402

SECTION = "Representation analysis at full-grid shape"
COMMAND = "python tests/benchmarks/bench_analysis.py"
SEEDS = (0, 1, 2)
FINAL_STEP = 30000


def synthetic_pair(rows: int, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 (rows, dims) activations sharing a power-law latent, ReLU'd like conv outputs."""
    rng = np.random.default_rng(seed)
    decay = (np.arange(1, dims + 1) ** -0.75).astype(np.float32)
    shared = rng.standard_normal((rows, dims), dtype=np.float32) * decay
    own = rng.standard_normal((rows, dims), dtype=np.float32) * decay
    mix = np.linalg.qr(rng.standard_normal((dims, dims)).astype(np.float32))[0]
    x = np.maximum(shared @ mix + 0.2, 0).astype(np.float16)
    y = np.maximum((0.8 * shared + 0.6 * own) @ mix + 0.2, 0).astype(np.float16)
    return x, y


class ProjectingExecutor:
    """Counts every decomposition and pair the cache asks for; runs the first of each shape for real."""

    name = "projected"

    def __init__(self, shape_of: dict[tuple[Path, str], tuple[int, int]], images: int) -> None:
        self.shape_of = shape_of
        self.images = images
        self.decompositions: Counter = Counter()
        self.pairs: Counter = Counter()
        self.decompose_cpu: dict[tuple[int, int], float] = {}
        self.decompose_wall: dict[tuple[int, int], float] = {}
        self.pair_cpu: dict[tuple, float] = {}
        self._decomposed: dict[tuple[int, int], tuple[Decomposition, Decomposition]] = {}
        self._scores: dict[tuple, PairScores] = {}

    def _decomposed_pair(self, shape: tuple[int, int], settings: AnalysisSettings):
        if shape not in self._decomposed:
            rows, dims = shape
            x, y = synthetic_pair(rows, dims, seed=rows + dims)
            groups = np.repeat(np.arange(self.images), math.ceil(rows / self.images))[:rows]
            cpu, wall = time.process_time(), time.perf_counter()
            pair = (decompose_representation(x, groups, settings), decompose_representation(y, groups, settings))
            self.decompose_cpu[shape] = (time.process_time() - cpu) / 2
            self.decompose_wall[shape] = (time.perf_counter() - wall) / 2
            self._decomposed[shape] = pair
            print(f"  decompose {rows} x {dims}: {self.decompose_cpu[shape]:.2f} CPU s", flush=True)
        return self._decomposed[shape]

    def analyse(self, groups, settings: AnalysisSettings) -> list[list[PairScores]]:
        out = []
        for group in groups:
            shapes = [self.shape_of[(item.path, item.layer)] for item in group.items]
            for shape in shapes:
                self.decompositions[shape] += 1
                self._decomposed_pair(shape, settings)
            results = []
            for i, _, measures in group.pairs:
                key = (shapes[i], measures)
                self.pairs[key] += 1
                if key not in self._scores:
                    x, y = self._decomposed_pair(shapes[i], settings)
                    cpu = time.process_time()
                    self._scores[key] = compare_decompositions(x, y, measures=measures, settings=settings)
                    self.pair_cpu[key] = time.process_time() - cpu
                    kind = f"{shapes[i][0]} x {shapes[i][1]} {'+'.join(measures)}"
                    print(f"  pair {kind}: {self.pair_cpu[key]:.2f} CPU s", flush=True)
                results.append(self._scores[key])
            out.append(results)
        return out


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def stub_grid(root: Path, *, models: list[str], resolution: int, probe_size: int, sampling: ProbeSampling):
    """Records of a finished grid whose probe files hold only layer names; the true shapes on the side."""
    records, shape_of, representations = [], {}, 0
    for model in models:
        plans = probe_plan(model, resolution=resolution, probe_size=probe_size, sampling=sampling)
        for init in PAPER_INITS:
            for seed in SEEDS:
                probe_dir = root / f"{model}-{init}-{seed}" / "probes"
                probe_dir.mkdir(parents=True)
                for step in (0, FINAL_STEP):
                    path = probe_dir / f"step-{step}.npz"
                    np.savez(path, **{p.layer: np.zeros((1, 1), np.float16) for p in plans})
                    shape_of.update({(path, p.layer): (p.rows, p.channels) for p in plans})
                    representations += len(plans)
                records.append(JobRecord(f"{model}{init}{seed}", f"run-{model}-{init}-{seed}", model, init, "full",
                                         seed, "FINISHED", probe_dir=probe_dir))  # fmt: skip
    return records, shape_of, representations


def time_pair(rows: int, dims: int, images: int = 256) -> str:
    """CPU and wall seconds of one Figure 2 pair (three measures, each with its chance level) of this shape."""
    settings = AnalysisSettings()
    x, y = synthetic_pair(rows, dims, seed=rows + dims)
    per = math.ceil(rows / images)
    groups = np.repeat(np.arange(images), per)[:rows]
    decomposed = [decompose_representation(a, groups, settings) for a in (x, y)]
    cpu, wall = time.process_time(), time.perf_counter()
    scores = compare_decompositions(*decomposed, measures=("svcca", "pwcca", "linear_cka"), settings=settings)
    values = ", ".join(f"{m} {v.score:.6f} (chance {v.chance:.6f})" for m, v in scores.scores.items())
    return (
        f"{rows} x {dims} pair, 3 measures: {time.process_time() - cpu:.2f} CPU s, {time.perf_counter() - wall:.2f}"
        f" wall s, load {os.getloadavg()[0]:.1f}; {values}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two CBR models at 96 px: checks the script")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--pair", metavar="ROWSxDIMS", help="time one three-measure Figure 2 pair of this shape")
    args = parser.parse_args(argv)
    if args.pair:
        rows, dims = (int(v) for v in args.pair.split("x"))
        print(time_pair(rows, dims))
        return

    grid = GridSpec.model_validate(PRESETS.get("full-grid")())
    t = grid.train
    sampling = ProbeSampling(rows_per_channel=t.probe_rows_per_channel, seed=t.probe_seed)
    models, resolution, probe_size = list(PAPER_MODELS), t.resolution, t.probe_size
    if args.quick:
        models, resolution, probe_size = ["cbr-tiny", "cbr-small"], 96, 64
    settings = AnalysisSettings()
    load_before = os.getloadavg()[0]
    started_cpu, started = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        records, shape_of, representations = stub_grid(
            Path(tmp), models=models, resolution=resolution, probe_size=probe_size, sampling=sampling
        )
        executor = ProjectingExecutor(shape_of, probe_size)
        cache = RepresentationCache(settings, executor=executor)
        cache.score_pairs(figure2_requests(records, cache) + figure4_requests(records, cache)
                          + seed_similarity_requests(records, cache))  # fmt: skip
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    load_after = os.getloadavg()[0]

    decompositions = sum(executor.decompositions.values())
    if decompositions != representations or cache.decompositions != representations:
        raise SystemExit(f"decompositions {decompositions} (cache {cache.decompositions}) != {representations}")
    decompose_total = sum(n * executor.decompose_cpu[s] for s, n in executor.decompositions.items())
    pair_total = sum(n * executor.pair_cpu[k] for k, n in executor.pairs.items())
    pair_count = sum(executor.pairs.values())

    lines = [
        f"Full-grid-shaped analysis: {len(models)} models x {len(PAPER_INITS)} inits x {len(SEEDS)} seeds, one data"
        f" size, probes at step 0 and {FINAL_STEP}; {resolution} px, {probe_size} probe images, sampling"
        f" `{sampling.describe()}`; SVCCA keep {settings.svcca_keep}, chance levels of {settings.chance_repeats}"
        " whole-image permutations for every value (Figures 2 and 4, seed table).",
        "",
        f"- Command: `{COMMAND}{' --quick' if args.quick else ''}`",
        f"- Machine: {machine_info()}; load average {load_before:.1f} before / {load_after:.1f} after"
        " (other helpers' processes were running: CPU seconds are the steadier number)",
        f"- Representations (run x layer x step): **{representations}**; decompositions performed by the planned"
        f" analysis: **{decompositions}** (one each); pairs: {pair_count}",
        f"- Measured for real: the first decomposition of each of the {len(executor.decompose_cpu)} distinct"
        f" shapes and the first pair of each of the {len(executor.pair_cpu)} (shape, measures) kinds;"
        f" {wall:.0f} s wall, {cpu:.0f} CPU s in all. The rest is projected from those CPU seconds.",
        f"- Projected CPU seconds: decompositions **{decompose_total:.0f}** (mean"
        f" {decompose_total / decompositions:.2f} per decomposition), pairs with their chance levels"
        f" **{pair_total:.0f}**; total **{decompose_total + pair_total:.0f}** CPU s"
        f" (~{(decompose_total + pair_total) / 3600:.1f} CPU h; the `full-grid` preset has two data sizes: twice that)",
        "- GPU projection: not measured (no GPU machine was lent to this session; `bench_gpu.py` has no"
        " numbers yet). The decompositions and pairs are float64 matrix products and eigh, which Ray places on"
        " GPUs when the cluster has them (`RayAnalysisExecutor`).",
        "",
        "| rows x dims | decompositions | CPU s each | pairs (SVCCA only / 3 measures) | CPU s per pair (SVCCA / 3) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for shape in sorted(executor.decompositions, key=lambda s: (s[1], s[0])):
        counts = {m: n for (s, m), n in executor.pairs.items() if s == shape}
        costs = {m: c for (s, m), c in executor.pair_cpu.items() if s == shape}
        one, three = ("svcca",), ("svcca", "pwcca", "linear_cka")
        lines.append(
            f"| {shape[0]} x {shape[1]} | {executor.decompositions[shape]} | {executor.decompose_cpu[shape]:.2f}"
            f" | {counts.get(one, 0)} / {counts.get(three, 0)}"
            f" | {_seconds(costs.get(one))} / {_seconds(costs.get(three))} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
