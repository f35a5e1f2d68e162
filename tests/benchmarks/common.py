"""Shared by the benchmarks: machine description and BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Measured on demand (`python -m tests.benchmarks.run_all`, or one `tests/benchmarks/bench_*.py`); "
    "each section says the machine, the date and the command. Ratios are against a baseline measured "
    "in the same run.\n\n"
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if match:
            return match.group(1).strip()
    return platform.processor() or "unknown CPU"


def machine_info() -> str:
    import numpy
    import torch

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} cores ({cpu}), {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {numpy.__version__}; {datetime.date.today().isoformat()}"
    )


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replaces (or appends) the ``## title`` section of BENCHMARKS.md, keeping the others."""
    heading = f"## {title}"
    text = path.read_text() if path.is_file() else HEADER
    section = f"{heading}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)
