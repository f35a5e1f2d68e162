"""One job on its own: ``python -m transfusion.train spec.yaml``, and under torchrun with DDP.

No Ray, no tracking server: metrics go to stdout and ``metrics.csv``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def _run(args: list[str], *, home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRANSFUSION_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            found.setdefault(row["key"], []).append((int(row["step"]), float(row["value"])))
    return found


def _write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_one_job_runs_standalone_and_resumes_from_its_own_checkpoint(session_home, tmp_path):
    spec = _write_spec(
        tmp_path / "spec.yaml", model="cbr-tiny", init="random", dataset="synthetic-retina", data_size=120, seed=0,
        dataset_options={"train": 240, "val": 64, "test": 64},
        train={"steps": 4, "batch_size": 16, "eval_every": 2, "resolution": 32, "probe_size": 16, "threads": 1},
    )  # fmt: skip
    out = tmp_path / "out"
    result = _run(["-m", "transfusion.train", str(spec), "--output-dir", str(out)], home=session_home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: 4 steps" in result.stdout and "val/auc=" in result.stdout
    metrics = _metrics(out / "metrics.csv")
    assert [step for step, _ in metrics["val/auc"]] == [0, 2, 4]
    assert 0.0 <= metrics["test/auc"][0][1] <= 1.0
    assert (out / "checkpoint" / "model.pt").is_file() and (out / "probes" / "step-4.npz").is_file()
    assert sorted(p.name for p in (out / "jobs" / "standalone").iterdir()) == ["state-00000002.pt", "state-00000004.pt"]

    # Run again with more steps: it continues from the step-4 state instead of starting over.
    longer = yaml.safe_load(spec.read_text())
    longer["train"]["steps"] = 6
    _write_spec(spec, **longer)
    again = _run(["-m", "transfusion.train", str(spec), "--output-dir", str(out)], home=session_home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stderr and "done: 6 steps" in again.stdout
    assert [step for step, _ in _metrics(out / "metrics.csv")["val/auc"]] == [0, 2, 4, 6]  # no second step-0


def test_a_missing_spec_file_is_one_line_and_a_nonzero_exit(tmp_path):
    result = _run(["-m", "transfusion.train", str(tmp_path / "nope.yaml")], home=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: spec file {tmp_path / 'nope.yaml'} does not exist"


@pytest.mark.slow
def test_inception_trains_its_aux_head_under_two_worker_ddp(session_home, tmp_path):
    # 299 px is the smallest input the aux head accepts: below it the head is frozen
    # instead. Before the fix the wrapped model skipped the aux head, and DDP failed at
    # its second step waiting for the aux head's gradients.
    spec = _write_spec(
        tmp_path / "spec.yaml", grid="ddp-inception", model="inception_v3", init="random", dataset="synthetic-retina",
        data_size=8, seed=0, dataset_options={"train": 16, "val": 4, "test": 4},
        train={"steps": 2, "batch_size": 4, "eval_every": 2, "resolution": 299, "probe_size": 0,
               "eval_batch_size": 4, "threads": 1},
    )  # fmt: skip
    out = tmp_path / "out"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = _run([*torchrun, "-m", "transfusion.train", str(spec), "--output-dir", str(out)], home=session_home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "aux logits skipped" not in result.stderr
    metrics = _metrics(out / "metrics.csv")
    assert [step for step, _ in metrics["train/loss"]] == [1, 2]  # logged once, by rank 0
    assert [step for step, _ in metrics["val/auc"]] == [0, 2]
