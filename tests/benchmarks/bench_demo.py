"""Wall time of the README's demo command on a fresh state directory.

    python tests/benchmarks/bench_demo.py [--no-write]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.common import machine_info, write_section  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--note", default="", help="conditions of the measurement, e.g. other load")
    args = parser.parse_args(argv)
    home = tempfile.mkdtemp(prefix="bench-demo-")
    env = {**os.environ, "TRANSFUSION_HOME": home}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    # Progress lines arrive as they happen: their arrival times split the wall time into phases.
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "demo"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[tuple[float, str]] = [(time.perf_counter() - started, line) for line in process.stdout]
    process.wait()
    wall = time.perf_counter() - started
    output = "".join(line for _, line in lines)
    print(output[-4000:])
    if process.returncode != 0:
        raise SystemExit(f"demo failed with exit code {process.returncode}")
    grid_start = next(t for t, line in lines if line.startswith("grid demo:"))
    jobs_done = max(t for t, line in lines if line.startswith("["))
    again_started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "demo"], cwd=REPO, env=env,
                           capture_output=True, text=True)  # fmt: skip
    again_wall = time.perf_counter() - again_started
    tables = [t for t in output.split("\n\n") if t.lstrip().startswith("|")]
    table = tables[0].strip() if tables else "(no table printed)"
    body = f"""Machine: {machine_info()}.
Command: `transfusion run demo` on an empty `TRANSFUSION_HOME` (data generation, pretraining of both CBR
nets on synthetic shapes, 12 jobs, analyses and report), then the same command again.

| run | wall time | goal |
|---|---|---|
| first (everything) | {wall:.0f} s ({wall / 60:.1f} min) | ≤ 5 min |
| again (nothing retrained) | {again_wall:.0f} s | |

Where the first run's time goes (from the arrival of its progress lines):

| phase | seconds |
|---|---:|
| start-up: Prefect and MLflow servers, data generation, Ray, pending-job check | {grid_start:.0f} |
| 12 jobs on 2 warm pool members, with both CBRs pretrained alongside | {jobs_done - grid_start:.0f} |
| results table, seed similarity, figures, report | {wall - jobs_done:.0f} |

{args.note}

Results of that run:

{table}
"""
    print(body)
    if not args.no_write:
        write_section("Demo grid wall time", body)


if __name__ == "__main__":
    main()
