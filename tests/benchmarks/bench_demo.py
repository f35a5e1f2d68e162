"""Wall time of the README's demo command on a fresh state directory.

    python tests/benchmarks/bench_demo.py [--no-baseline] [--no-write]

The baseline, measured in the same run unless ``--no-baseline``: the same command with
``TRANSFUSION_REUSE_WORKERS=0`` (a fresh Ray Train run for every job) on its own fresh
state directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.common import machine_info, write_section  # noqa: E402

COMMAND = [sys.executable, "-m", "flows.cli", "run", "demo"]


@dataclass
class DemoRun:
    wall: float
    grid_start: float  # the "grid demo: ..." line: services, data, Ray and sources are under way
    jobs_done: float  # the last "[n/12]" line
    output: str


def run_demo(home: str, *, reuse_workers: bool) -> DemoRun:
    env = {**os.environ, "TRANSFUSION_HOME": home, "TRANSFUSION_REUSE_WORKERS": "1" if reuse_workers else "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    # Progress lines arrive as they happen: their arrival times split the wall time into phases.
    process = subprocess.Popen(COMMAND, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - started, line) for line in process.stdout]
    process.wait()
    wall = time.perf_counter() - started
    output = "".join(line for _, line in lines)
    if process.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"demo failed with exit code {process.returncode}")
    grid_start = next(t for t, line in lines if line.startswith("grid demo:"))
    jobs_done = max(t for t, line in lines if line.startswith("["))
    return DemoRun(wall, grid_start, jobs_done, output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-baseline", action="store_true", help="skip the fresh-run-per-job baseline")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--note", default="", help="conditions of the measurement, e.g. other load")
    args = parser.parse_args(argv)
    home = tempfile.mkdtemp(prefix="bench-demo-")
    demo = run_demo(home, reuse_workers=True)
    print(demo.output[-4000:])
    again = run_demo(home, reuse_workers=True)
    baseline = None if args.no_baseline else run_demo(tempfile.mkdtemp(prefix="bench-demo-fresh-"), reuse_workers=False)

    tables = [t for t in demo.output.split("\n\n") if t.lstrip().startswith("|")]
    table = tables[0].strip() if tables else "(no table printed)"
    baseline_row = ""
    if baseline is not None:
        ratio = demo.wall / baseline.wall
        baseline_row = (
            f"| baseline: first run with `TRANSFUSION_REUSE_WORKERS=0` (a fresh Ray Train run per job) | "
            f"{baseline.wall:.0f} s ({baseline.wall / 60:.1f} min); first run ÷ baseline = {ratio:.2f} | |\n"
        )

    def phases(run: DemoRun) -> tuple[str, str, str]:
        return f"{run.grid_start:.0f}", f"{run.jobs_done - run.grid_start:.0f}", f"{run.wall - run.jobs_done:.0f}"

    labels = (
        "start-up: Prefect and MLflow servers, data generation, Ray, pending-job check",
        "12 jobs, 2 at a time, with both CBRs pretrained alongside",
        "results table, seed similarity, figures, report",
    )
    columns = [phases(demo)] + ([phases(baseline)] if baseline is not None else [])
    header = "| phase | warm pool members (default) |" + (" fresh Ray Train run per job |" if baseline else "")
    rule = "|---|---:|" + ("---:|" if baseline else "")
    phase_rows = "\n".join(
        f"| {label} | " + " | ".join(column[i] for column in columns) + " |" for i, label in enumerate(labels)
    )
    command = "python tests/benchmarks/bench_demo.py" + (" --no-baseline" if baseline is None else "")
    then_baseline = ", then the baseline on another empty `TRANSFUSION_HOME`" if baseline is not None else ""
    body = f"""Machine: {machine_info()}.
Command: `{command}`: `transfusion run demo` on an empty `TRANSFUSION_HOME`
(data generation, pretraining of both CBR nets on synthetic shapes, 12 jobs, analyses and report), then
the same command again{then_baseline}.

| run | wall time | goal |
|---|---|---|
| first (everything) | **{demo.wall:.0f} s ({demo.wall / 60:.1f} min)** | ≤ 5 min |
| again (nothing retrained) | {again.wall:.0f} s | |
{baseline_row}
Where a first run's time goes (seconds, from the arrival of its progress lines):

{header}
{rule}
{phase_rows}

{args.note}

Results of the first run:

{table}
"""
    print(body)
    if not args.no_write:
        write_section("Demo grid wall time", body)


if __name__ == "__main__":
    main()
