"""Per-job fixed overhead and wrapper cost of the whole path, against a bare PyTorch loop.

    python tests/benchmarks/bench_overhead.py [--jobs 4] [--steps 60] [--no-write]

1. Per-job fixed overhead: ``time/total_s - time/train_s`` of small jobs run through the
   whole path (Prefect task, Ray Train, MLflow server), one at a time, median over jobs;
   once with a fresh Ray Train run per job (``TRANSFUSION_REUSE_WORKERS=0``, the baseline)
   and once on warm pool members (the default), in the same process. Where the time goes:
   ``time/launch_s`` (queued until a worker picks the job up), ``time/setup_s`` (model
   build, FLOPs count, step-0 batch-norm recalibration, probe and evaluation), ``time/finish_s`` (final probe, test
   evaluation, weights upload); the rest is the task's own MLflow calls (find/create/tag
   the run, end it) and the result's trip back.
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

PARTS = ("time/launch_s", "time/setup_s", "time/finish_s")
REST_LABEL = (
    "rest: the task's MLflow calls (find, create, tag, end the run), the broker actor's start (first job), result back"
)


def _run_grid(name: str, jobs: int, train: dict, *, reuse: bool) -> tuple[list[dict], float]:
    """Trains a grid of ``jobs`` seeds; returns each job's final metrics and the wall time."""
    from flows.grid import transfusion
    from flows.runtime import tracking_service
    from tasks.analysis import identified_jobs
    from transfusion import tracking
    from transfusion.config import load_grid
    from transfusion.data import transfusion_home

    os.environ["TRANSFUSION_REUSE_WORKERS"] = "1" if reuse else "0"
    grid = load_grid({
        "name": name, "dataset": "synthetic-retina", "models": ["cbr-tiny"], "inits": ["random"],
        "seeds": jobs, "train": train, "max_concurrent": 1,
    })  # fmt: skip
    started = time.perf_counter()
    summary = transfusion(grid, stage="train")
    wall = time.perf_counter() - started
    with tracking_service(transfusion_home()):
        matches = tracking.match_job_runs(summary.experiment_id, identified_jobs(grid))
        runs = [tracking.client().get_run(match.run.run_id) for match in matches]
    # In the order the jobs ran: the first one pays for starting the first worker.
    runs.sort(key=lambda run: run.info.start_time)
    return [dict(run.data.metrics) for run in runs], wall


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _breakdown(metrics: list[dict]) -> dict[str, float]:
    overheads = [m["time/total_s"] - m["time/train_s"] for m in metrics]
    parts = {key: _median([m.get(key, 0.0) for m in metrics]) for key in PARTS}
    rest = [m["time/total_s"] - m["time/train_s"] - sum(m.get(k, 0.0) for k in PARTS) for m in metrics]
    return {"overhead": _median(overheads), **parts, "tracking": _median(rest)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--earlier-baseline",
        metavar="SECONDS@DATE",
        default=None,
        help="also compare with a per-job overhead measured earlier (not in this run), e.g. 11.3@2026-11-25",
    )
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ["TRANSFUSION_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import torch

    from transfusion.config import load_grid
    from transfusion.data import prepare_dataset
    from transfusion.train import RecordingHooks, run_training

    train = {"steps": args.steps, "batch_size": 32, "eval_every": args.steps, "resolution": 40, "probe_size": 64}
    probe_grid = load_grid({"name": "bench-bare", "dataset": "synthetic-retina", "models": ["cbr-tiny"],
                            "inits": ["random"], "seeds": 1, "train": train})  # fmt: skip
    dataset = prepare_dataset(probe_grid.dataset, resolution=probe_grid.train.resolution)

    # Bare loop: same spec, same thread count as a Ray worker (cpus_per_job = 1).
    torch.set_num_threads(1)
    bare = run_training(probe_grid.jobs()[0], dataset, hooks=RecordingHooks())
    bare_ips = args.steps * train["batch_size"] / bare.train_seconds

    fresh, fresh_wall = _run_grid("bench-fresh-run-per-job", args.jobs, train, reuse=False)
    warm, warm_wall = _run_grid("bench-warm-pool", args.jobs, train, reuse=True)
    before, cold, after = _breakdown(fresh), _breakdown(warm[:1]), _breakdown(warm[1:])
    ray_ips = _median([args.steps * train["batch_size"] / m["time/train_s"] for m in warm])
    each = ", ".join(f"{m['time/total_s'] - m['time/train_s']:.1f}" for m in warm)
    each_fresh = ", ".join(f"{m['time/total_s'] - m['time/train_s']:.1f}" for m in fresh)

    overall = _breakdown(warm)["overhead"]
    throughput = f"{ray_ips / bare_ips:.3f} ({ray_ips:.0f} vs {bare_ips:.0f} images/s)"
    walls = f"{fresh_wall:.0f} s / {warm_wall:.0f} s"

    def row(label: str, key: str) -> str:
        return f"| {label} | {before[key]:.2f} | {cold[key]:.2f} | {after[key]:.2f} |"

    body = f"""Machine: {machine_info()}.
Command: `python tests/benchmarks/bench_overhead.py --jobs {args.jobs} --steps {args.steps}`
(cbr-tiny, 40 px, batch 32, {args.steps} steps, {args.jobs} jobs one at a time, embedded default: in-process
Ray, local MLflow server, Prefect; the same process runs both modes, fresh first).

| measure | value | goal |
|---|---|---|
| per-job overhead (`time/total_s` − `time/train_s`), median, warm pool | **{overall:.1f} s** ({each}) | ≤ 8 s |
| same, a fresh Ray Train run per job (`TRANSFUSION_REUSE_WORKERS=0`) | {before["overhead"]:.1f} s ({each_fresh}) | |
| overhead ratio, warm pool ÷ fresh run per job | {overall / before["overhead"]:.2f} | |
| throughput in the Ray Train job ÷ bare loop | {throughput} | ≥ 0.95 |
| grid wall time, {args.jobs} jobs (Ray start, Prefect tasks, no analysis): fresh / warm | {walls} | |

Where the overhead goes (seconds, medians; "first warm-pool job" starts the member the others reuse):

| part | fresh run per job | first warm-pool job | later warm-pool jobs |
|---|---:|---:|---:|
{row("overhead, total", "overhead")}
{row("`time/launch_s`: queued → picked up (controller, worker group, imports)", "time/launch_s")}
{row("`time/setup_s`: model build, FLOPs, step-0 BN recalibration + probe + evaluation", "time/setup_s")}
{row("`time/finish_s`: final probe, test evaluation, weights upload", "time/finish_s")}
{row(REST_LABEL, "tracking")}
"""
    if args.earlier_baseline:
        # A number from an earlier run is labelled as such: this run did not measure it.
        seconds, _, date = args.earlier_baseline.partition("@")
        body += f"""
The fresh mode also starts a broker actor per job and waits for its Ray Train run to end, so it
costs more than the code before the pool did. Earlier baseline, not re-measured in this run: one
`TorchTrainer.fit()` per job, {float(seconds):.1f} s median overhead on this machine ({date or "date not given"},
same command); against it, the warm pool's overhead is {overall / float(seconds):.2f}×.
"""
    print(body)
    if not args.no_write:
        write_section("Per-job overhead and wrapper cost", body)


if __name__ == "__main__":
    main()
