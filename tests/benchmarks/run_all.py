"""Runs every benchmark and records each in BENCHMARKS.md: ``python -m tests.benchmarks.run_all``.

The GPU benchmark runs only where CUDA is available; elsewhere it is listed as skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_similarity.py", "bench_analysis.py", "bench_basin.py", "bench_loader.py", "bench_overhead.py",
           "bench_demo.py"]  # fmt: skip
GPU_SCRIPTS = ["bench_gpu.py"]


def main() -> int:
    import torch

    scripts = SCRIPTS + (GPU_SCRIPTS if torch.cuda.is_available() else [])
    if not torch.cuda.is_available():
        print("skipped (no CUDA device): " + ", ".join(GPU_SCRIPTS), flush=True)
    failed = []
    for script in scripts:
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)], cwd=HERE.parents[1]).returncode != 0:
            failed.append(script)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
