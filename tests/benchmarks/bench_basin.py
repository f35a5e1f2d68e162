"""Same basin? and how far from the source: analysis cost, measured at ``what-transfers-cpu`` shape and
projected to ``what-transfers``.

Measured: every interpolation pair the analysis plans for the ``what-transfers-cpu`` grid
(cbr-tiny at 48 px on its synthetic retina, blocks none/8/4/1, random and transfer, seeds 0
and 1: :func:`transfusion.analysis.basin.interpolation_pairs`) at the default 11 alphas, on
the grid's real prepared data, in this process (the serial executor, one torch thread: CPU
seconds are the steady number on a shared machine). The endpoint weights are drawn, not
trained: a forward costs the same whatever the weights. Then the CKA(source, trained) part
(one decomposition per source probe, one pair with its chance level per transfer run and
layer) on probes of that shape (320 images).

Projected to ``what-transfers`` (ResNet-50 at 224 px, CheXpert, 2 data sizes x 5 block sizes
x 3 seeds): the planned pair count x 11 alphas x (256 recalibration + test images) x the CPU
seconds of one ResNet-50 forward measured here; and the source-CKA part from one
decomposition and one linear-CKA pair measured at each of its probe shapes (512 images).

Run from the repository root::

    python tests/benchmarks/bench_basin.py             # writes the BENCHMARKS.md section
    python tests/benchmarks/bench_basin.py --quick --no-write   # no ResNet-50 shapes: checks the script
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.bench_analysis import synthetic_pair  # noqa: E402
from tests.benchmarks.common import machine_info, write_section  # noqa: E402
from transfusion.analysis.basin import (  # noqa: E402
    DatasetLocation,
    InterpolationInputs,
    interpolate_pairs,
    interpolation_pairs,
)
from transfusion.analysis.records import JobRecord  # noqa: E402
from transfusion.analysis.representations import (  # noqa: E402
    AnalysisSettings,
    RepresentationCache,
    compare_decompositions,
    decompose_representation,
)
from transfusion.analysis.source_distance import SOURCE_MEASURE, source_distance_rows  # noqa: E402
from transfusion.config import GridSpec  # noqa: E402
from transfusion.cost import forward_flops  # noqa: E402
from transfusion.data import prepare_dataset  # noqa: E402
from transfusion.models import create_model  # noqa: E402
from transfusion.presets import PRESETS  # noqa: E402
from transfusion.probes import ProbeSampling, capture_activations, probe_plan, save_probe  # noqa: E402
from transfusion.train import INIT_BN_IMAGES, create_job_model, load_images  # noqa: E402

SECTION = "Same basin? and how far from the source: analysis cost"
COMMAND = "python tests/benchmarks/bench_basin.py"
CHEXPERT_TEST_IMAGES = 234  # valid.csv, CheXpert's test split (frontal_only keeps fewer: an upper bound)


def _records(grid: GridSpec, dataset, root: Path) -> tuple[list[JobRecord], dict[str, Path]]:
    """One record per job of ``grid`` with drawn final weights stored under ``root``."""
    records, weights = [], {}
    for spec in grid.jobs():
        run_id = f"run-{spec.init}-{spec.block_shuffle}-{spec.seed}"
        torch.manual_seed(spec.seed + (100 if spec.init == "imagenet" else 0))
        path = root / f"{run_id}.pt"
        torch.save(create_job_model(spec, dataset).state_dict(), path)
        weights[run_id] = path
        records.append(JobRecord(spec.job_key, run_id, spec.model, spec.init_label, str(spec.data_size), spec.seed,
                                 "FINISHED", block_shuffle=str(spec.block_shuffle)))  # fmt: skip
    return records, weights


def measure_interpolation(grid: GridSpec, root: Path) -> dict:
    t = grid.train
    dataset = prepare_dataset(grid.dataset, resolution=t.resolution, options=grid.dataset_options, home=root)
    records, weights = _records(grid, dataset, root)
    # As the grid analyses itself (its interpolation_* fields), in this process.
    settings = AnalysisSettings(interpolation_points=grid.interpolation_points,
                                interpolation_pairs=grid.interpolation_pairs, executor="serial")  # fmt: skip
    inputs = InterpolationInputs({s.job_key: s for s in grid.jobs()}, weights.__getitem__,
                                 lambda: DatasetLocation(str(dataset.root)))  # fmt: skip
    cpu, wall = time.process_time(), time.perf_counter()
    result = interpolate_pairs(records, inputs, settings)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    errors = [c.error for c in result.curves if c.error]
    if errors:
        raise SystemExit(f"interpolation failed: {errors[0]}")
    images = min(INIT_BN_IMAGES, len(dataset.indices("train"))) + len(dataset.indices("test"))
    return {"pairs": len(result.pairs), "cpu": cpu, "wall": wall, "images": images,
            "alphas": settings.interpolation_points, "cap": settings.interpolation_pairs, "records": records,
            "dataset": dataset}  # fmt: skip


def measure_source_similarity(grid: GridSpec, measured: dict, root: Path) -> dict:
    """CKA(source, trained) of every transfer run of the grid on probes of its shape (drawn weights)."""
    t, dataset = grid.train, measured["dataset"]
    images = load_images(dataset, dataset.indices("val")[: t.probe_size], torch.device("cpu"))
    sampling = ProbeSampling(rows_per_channel=t.probe_rows_per_channel, seed=t.probe_seed)
    records = []
    for record in measured["records"]:
        if record.init == "random":
            continue
        probes = root / record.run_id / "probes"
        probes.mkdir(parents=True)
        for name, seed in (("source.npz", 7), (f"step-{t.steps}.npz", record.seed)):
            torch.manual_seed(seed)
            model = create_model(grid.models[0], num_classes=dataset.num_labels)
            save_probe(probes / name, capture_activations(model, images, sampling=sampling))
        records.append(JobRecord(record.job_key, record.run_id, record.model, record.init, record.data_size,
                                 record.seed, "FINISHED", probe_dir=probes))  # fmt: skip
    cache = RepresentationCache(AnalysisSettings(executor="serial"))
    cpu, wall = time.process_time(), time.perf_counter()
    rows = source_distance_rows(records, cache)
    return {"runs": len(records), "layers": len({r.layer for r in rows}), "decompositions": cache.decompositions,
            "cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}  # fmt: skip


def resnet_forward_cpu_s(resolution: int, *, batch: int = 8) -> tuple[float, float]:
    """CPU seconds per image of a ResNet-50 forward (eval, and train mode as recalibration runs it), and its FLOPs."""
    model = create_model("resnet50", num_classes=5).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    costs = []
    with torch.no_grad():
        for train_mode in (False, True):
            model.train(train_mode)
            model(x)  # warm-up
            cpu = time.process_time()
            model(x)
            costs.append((time.process_time() - cpu) / batch)
    return float(np.mean(costs)), float(forward_flops(model, in_channels=3, resolution=resolution))


def resnet_cka_costs(grid: GridSpec) -> list[tuple[int, int, float, float]]:
    """(rows, dims, CPU s per decomposition, CPU s per linear-CKA pair with chance) at each probe shape."""
    t = grid.train
    sampling = ProbeSampling(rows_per_channel=t.probe_rows_per_channel, seed=t.probe_seed)
    settings = AnalysisSettings()
    out = []
    for plan in probe_plan("resnet50", resolution=t.resolution, probe_size=t.probe_size, sampling=sampling):
        x, y = synthetic_pair(plan.rows, plan.channels, seed=plan.rows)
        groups = np.repeat(np.arange(t.probe_size), math.ceil(plan.rows / t.probe_size))[: plan.rows]
        cpu = time.process_time()
        decomposed = [decompose_representation(a, groups, settings) for a in (x, y)]
        decompose = (time.process_time() - cpu) / 2
        cpu = time.process_time()
        compare_decompositions(*decomposed, measures=(SOURCE_MEASURE,), settings=settings)
        out.append((plan.rows, plan.channels, decompose, time.process_time() - cpu))
        print(f"  {plan.rows} x {plan.channels}: decomposition {decompose:.2f}, CKA pair {out[-1][3]:.2f} CPU s")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the ResNet-50 measurements (checks the script)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cpu_grid = GridSpec.model_validate(PRESETS.get("what-transfers-cpu")())
    big_grid = GridSpec.model_validate(PRESETS.get("what-transfers")())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure_interpolation(cpu_grid, Path(tmp))
        print(f"interpolation: {measured['pairs']} pairs, {measured['cpu']:.1f} CPU s", flush=True)
        source = measure_source_similarity(cpu_grid, measured, Path(tmp))
        print(f"source CKA: {source['runs']} runs, {source['cpu']:.1f} CPU s", flush=True)
    per_pair = measured["cpu"] / measured["pairs"]
    per_image = measured["cpu"] / (measured["pairs"] * measured["alphas"] * measured["images"])
    cpu_total = measured["cpu"] + source["cpu"]
    small_model = create_model(cpu_grid.models[0], num_classes=1)
    small_flops = forward_flops(small_model, in_channels=3, resolution=cpu_grid.train.resolution)
    small_work = small_flops * measured["pairs"] * measured["alphas"] * measured["images"]

    fake = [JobRecord(s.job_key, f"{s.init}{s.block_shuffle}{s.data_size}{s.seed}", s.model, s.init_label,
                      str(s.data_size), s.seed, "FINISHED", block_shuffle=str(s.block_shuffle))
            for s in big_grid.jobs()]  # fmt: skip
    big_pairs = len(interpolation_pairs(fake, max_pairs=big_grid.interpolation_pairs))
    big_images = INIT_BN_IMAGES + CHEXPERT_TEST_IMAGES
    big_forwards = big_pairs * big_grid.interpolation_points * big_images
    transfer_runs = sum(1 for s in big_grid.jobs() if s.init != "random")
    lines = [
        f"- Command: `{COMMAND}`",
        f"- Machine: {machine_info()}, 24 GiB; one torch thread; load average {load_before:.1f} before /"
        f" {os.getloadavg()[0]:.1f} after (other processes were running: CPU seconds are the steadier number)",
        "",
        f"**Measured at `what-transfers-cpu` shape** (cbr-tiny, 48 px, 4 block sizes x 2 seeds x random/transfer;"
        f" {measured['images']} images per alpha: {min(INIT_BN_IMAGES, 400)} recalibration + 200 test):",
        "",
        "| part | work | CPU s | wall s |",
        "| --- | --- | ---: | ---: |",
        f"| interpolation (serial) | {measured['pairs']} pairs (`interpolation_pairs: {measured['cap']}`) x"
        f" {measured['alphas']} alphas"
        f" ({per_pair:.1f} CPU s a pair, {1e3 * per_image:.2f} ms an image) | {measured['cpu']:.0f}"
        f" | {measured['wall']:.0f} |",
        f"| CKA(source, trained) | {source['runs']} transfer runs x {source['layers']} layers,"
        f" {source['decompositions']} decompositions, chance levels | {source['cpu']:.1f} | {source['wall']:.1f} |",
        "| distances from init | logged by each job (a few norms at its end) | ~0 | ~0 |",
        f"| **both** | | **{cpu_total:.0f}** | |",
        "",
        f"In `transfusion run what-transfers-cpu` the interpolation's estimated work ({measured['pairs']} x"
        f" {measured['alphas']} x {measured['images']} forwards of {small_flops / 1e6:.0f} MFLOP,"
        f" {small_work / 1e12:.0f} TFLOP) is"
        f" {'above' if small_work >= AnalysisSettings().ray_min_flops else 'below'} `ray_min_flops`"
        f" ({AnalysisSettings().ray_min_flops:.0e}), so it runs"
        + (
            " as Ray tasks, one per pair, one CPU each: about half the CPU seconds in wall time on 2 idle cores,"
            " plus the Ray workers' start."
            if small_work >= AnalysisSettings().ray_min_flops
            else " in-process."
        ),
    ]
    if not args.quick:
        resnet_cpu, resnet_flops = resnet_forward_cpu_s(big_grid.train.resolution)
        cka = resnet_cka_costs(big_grid)
        per_run = sum(d + p for _, _, d, p in cka)
        interpolation_cpu = big_forwards * resnet_cpu
        lines += [
            "",
            f"**Projected to `what-transfers` shape** (ResNet-50, 224 px, CheXpert, {len(big_grid.jobs())} runs):",
            "",
            f"- Interpolation: {big_pairs} pairs (at most {big_grid.interpolation_pairs} per kind in each of"
            f" the 10 (size, block) cells) x {big_grid.interpolation_points} alphas x ({INIT_BN_IMAGES} +"
            f" {CHEXPERT_TEST_IMAGES} test) images ="
            f" {big_forwards:,} ResNet-50 forwards of {resnet_flops / 1e9:.1f} GFLOP"
            f" ({big_forwards * resnet_flops / 1e15:.1f} PFLOP). One forward measured here: {resnet_cpu:.2f} CPU s"
            f" an image, so **{interpolation_cpu / 3600:.0f} CPU h** on CPUs; {interpolation_cpu / big_pairs / 60:.0f}"
            " CPU min a pair. On a GPU each pair is one Ray task (`RayAnalysisExecutor.interpolate`); its rate there"
            " is not measured (no GPU was lent to this session).",
            f"- CKA(source, trained): {transfer_runs} transfer runs x {len(cka)} layers; per run one decomposition"
            " of its source probe and one pair with its chance level per layer (the final probe's decomposition is"
            f" Figure 4's): **{per_run:.0f} CPU s a run**, {transfer_runs * per_run / 3600:.1f} CPU h in all.",
            "",
            "| probe rows x dims | CPU s per decomposition | CPU s per linear-CKA pair (with chance) |",
            "| --- | ---: | ---: |",
            *(f"| {rows} x {dims} | {d:.2f} | {p:.2f} |" for rows, dims, d, p in cka),
        ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
