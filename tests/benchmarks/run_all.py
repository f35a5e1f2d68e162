"""Runs every benchmark and records each in BENCHMARKS.md: ``python -m tests.benchmarks.run_all``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_similarity.py", "bench_loader.py", "bench_overhead.py", "bench_demo.py"]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)], cwd=HERE.parents[1]).returncode != 0:
            failed.append(script)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
