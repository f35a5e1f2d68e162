"""Per-job fixed overhead and wrapper cost of the whole path, against a bare PyTorch loop.

    python tests/benchmarks/bench_overhead.py [--jobs 4] [--no-write]

1. Per-job fixed overhead: ``time/total_s - time/train_s`` of tiny jobs run through the
   whole path (Prefect task, Ray Train, MLflow server), median over jobs.
2. Wrapper cost: training throughput (images/s of the loop) inside the Ray Train job
   vs the bare loop on the same model, batch and data: the ratio should be >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.common import machine_info, write_section  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ["TRANSFUSION_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import torch

    from flows.grid import transfusion
    from transfusion import tracking
    from transfusion.config import load_grid
    from transfusion.data import prepare_dataset
    from transfusion.services import tracking_service
    from transfusion.train import RecordingHooks, run_training

    train = {"steps": args.steps, "batch_size": 32, "eval_every": args.steps, "resolution": 40, "probe_size": 64}
    grid = load_grid({
        "name": "bench-overhead", "dataset": "synthetic-retina", "models": ["cbr-tiny"], "inits": ["random"],
        "seeds": args.jobs, "train": train, "max_concurrent": 1,
    })  # fmt: skip
    dataset = prepare_dataset(grid.dataset, resolution=grid.train.resolution, options=grid.dataset_options)

    # Bare loop: same spec, same thread count as a Ray worker (cpus_per_job = 1).
    torch.set_num_threads(1)
    bare = run_training(grid.jobs()[0], dataset, hooks=RecordingHooks())
    bare_ips = args.steps * train["batch_size"] / bare.train_seconds

    started = time.perf_counter()
    summary = transfusion(grid)
    wall = time.perf_counter() - started
    with tracking_service(home):
        overheads, ray_ips = [], []
        for spec in grid.jobs():
            run = tracking.find_finished_run(summary.experiment_id, spec.job_key)
            m = run.data.metrics
            overheads.append(m["time/total_s"] - m["time/train_s"])
            ray_ips.append(args.steps * train["batch_size"] / m["time/train_s"])
    median_overhead = statistics.median(overheads)
    ray_median = statistics.median(ray_ips)
    ratio = ray_median / bare_ips
    each = "all: " + ", ".join(f"{o:.1f}" for o in overheads)
    body = f"""Machine: {machine_info()}.
Command: `python tests/benchmarks/bench_overhead.py --jobs {args.jobs} --steps {args.steps}`
(cbr-tiny, 40 px, batch 32, {args.steps} steps, one job at a time, embedded default: in-process Ray,
local MLflow server).

| measure | value | goal |
|---|---|---|
| per-job overhead (`time/total_s` − `time/train_s`), median of {args.jobs} | {median_overhead:.1f} s ({each}) | ≤ 8 s |
| throughput in the Ray Train job / bare loop | {ratio:.3f} ({ray_median:.0f} vs {bare_ips:.0f} images/s) | ≥ 0.95 |
| grid wall time ({args.jobs} jobs, incl. Prefect, MLflow and Ray start-up, analysis) | {wall:.0f} s | |
"""
    print(body)
    if not args.no_write:
        write_section("Per-job overhead and wrapper cost", body)


if __name__ == "__main__":
    main()
