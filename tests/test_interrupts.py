"""Ctrl-C and SIGTERM mid-job: one line, exit 128 + signal, every run closed, no server left, a re-run continues."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, command_env, processes_mentioning, run_cli

# One job, long enough to be mid-training when signalled; checkpoints every 3 steps.
GRID = {
    "name": "interrupted",
    "dataset": "synthetic-retina",
    "dataset_options": {"train": 240, "val": 64, "test": 64},
    "models": ["cbr-tiny"],
    "inits": ["random"],
    "data_sizes": [120],
    "seeds": [0],
    "train": {"steps": 24, "batch_size": 16, "eval_every": 12, "checkpoint_every": 3, "resolution": 32,
              "probe_size": 16},
}  # fmt: skip


def _grid_file(home: Path) -> Path:
    path = home / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    return path


def _start_grid(home: Path, grid: Path) -> tuple[subprocess.Popen, Path]:
    env = command_env(home)
    stderr = home / "stderr.txt"
    with open(home / "stdout.txt", "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(grid)], cwd=REPO, env=env, stdout=out, stderr=err,
            start_new_session=True,  # like a terminal's foreground job: the signal goes to the process
        )  # fmt: skip
    return process, stderr


def _wait_for_step(db_path: Path, process: subprocess.Popen, *, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the grid ended (code {process.returncode}) before being signalled"
        if db_path.exists():
            try:
                with sqlite3.connect(db_path) as db:
                    (reached,) = db.execute(
                        "select coalesce(max(m.step), 0) from metrics m join runs r on r.run_uuid = m.run_uuid "
                        "where r.status = 'RUNNING' and m.key = 'train/loss'"
                    ).fetchone()  # fmt: skip
            except sqlite3.OperationalError:  # tables not created yet
                reached = 0
            if reached >= step:
                return
        time.sleep(0.3)
    raise TimeoutError(f"no running job reached step {step}")


def _interrupt_mid_job(home: Path, signum: int) -> tuple[int, str, float]:
    process, stderr = _start_grid(home, _grid_file(home))
    try:
        _wait_for_step(home / "mlflow.db", process, step=7)  # past two checkpoints
        os.kill(process.pid, signum)
        sent = time.monotonic()
        code = process.wait(timeout=60)
        return code, stderr.read_text(), time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _runs(home: Path) -> list[tuple[str, str, dict]]:
    with sqlite3.connect(home / "mlflow.db") as db:
        runs = db.execute("select run_uuid, status from runs").fetchall()
        tags = db.execute("select run_uuid, key, value from tags").fetchall()
    by_run: dict[str, dict] = {}
    for run_id, key, value in tags:
        by_run.setdefault(run_id, {})[key] = value
    return [(run_id, status, by_run.get(run_id, {})) for run_id, status in runs]


def _assert_stopped_cleanly(home: Path, code: int, stderr: str, seconds: float, name: str, expected: int) -> None:
    assert code == expected, stderr
    # The grid's progress lines come before; the interrupt adds exactly one line and no traceback.
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == f"transfusion: interrupted by {name}; runs marked KILLED, re-run to continue", stderr
    assert [line for line in lines if line.startswith("transfusion:")] == lines[-1:], stderr
    assert not [line for line in lines[:-1] if not line.startswith(("grid ", "  ", "["))], stderr
    assert "Traceback" not in stderr
    assert seconds < 30, f"stopping took {seconds:.0f} s"
    runs = _runs(home)
    assert runs and all(status == "KILLED" for _, status, _ in runs), runs  # the grid's run and the job's
    assert {tags.get("failure_reason") for _, _, tags in runs} == {f"interrupted by {name}"}
    deadline = time.monotonic() + 10  # Ray's workers notice their raylet is gone within moments
    while processes_mentioning(str(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(str(home)), processes_mentioning(str(home))


@pytest.mark.slow
def test_ctrl_c_mid_job_closes_every_run_and_leaves_no_server(tmp_path):
    code, stderr, seconds = _interrupt_mid_job(tmp_path, signal.SIGINT)
    _assert_stopped_cleanly(tmp_path, code, stderr, seconds, "SIGINT", 130)


@pytest.mark.slow
def test_sigterm_mid_job_then_rerun_continues_from_checkpoint(tmp_path):
    code, stderr, seconds = _interrupt_mid_job(tmp_path, signal.SIGTERM)
    _assert_stopped_cleanly(tmp_path, code, stderr, seconds, "SIGTERM", 143)

    again = run_cli("run", str(tmp_path / "grid.yaml"), home=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Grid interrupted: 1 trained, 0 already done, 0 failed" in again.stdout
    jobs = [(run_id, status, tags) for run_id, status, tags in _runs(tmp_path) if tags.get("job_key")]
    assert len(jobs) == 1, jobs  # the same run continued: no duplicate
    run_id, status, tags = jobs[0]
    assert status == "FINISHED" and tags["attempts"] == "2" and tags["interruptions"] == "1", tags
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        steps = [s for (s,) in db.execute(
            "select step from metrics where run_uuid = ? and key = 'train/loss'", (run_id,)
        )]  # fmt: skip
        evaluated_at_0 = db.execute(
            "select count(*) from metrics where run_uuid = ? and key = 'val/auc' and step = 0", (run_id,)
        ).fetchone()[0]  # fmt: skip
    # From its last checkpoint (step >= 6), not from scratch: step 0 evaluated once, no early step repeated.
    assert evaluated_at_0 == 1
    assert max(steps) in (GRID["train"]["steps"] - 1, GRID["train"]["steps"])
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert all(s > 3 for s in repeated), repeated
    assert not processes_mentioning(str(tmp_path))


def _sleeper() -> subprocess.Popen:
    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{process.pid}/cmdline").read_bytes() != b"sleep\x00120\x00" and time.monotonic() < deadline:
        time.sleep(0.05)  # until it has exec'd
    return process


def test_a_tied_server_whose_owner_died_is_stopped_by_the_next_start(tmp_path):
    import json

    from flows.runtime import reap_orphaned_services

    dead_owner = subprocess.Popen(["true"])
    dead_owner.wait()
    orphan, adopted, reused = _sleeper(), _sleeper(), _sleeper()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    try:
        records = {
            "orphan": {"pid": orphan.pid, "owner": dead_owner.pid},
            "adopted": {"pid": adopted.pid, "owner": os.getpid()},  # its owner still runs
            # pid reused by another program since: never killed
            "reused": {"pid": reused.pid, "owner": dead_owner.pid, "cmdline": "mlflow\x00server\x00"},
        }
        for name, record in records.items():
            record.setdefault("cmdline", "sleep\x00120\x00")
            (run_dir / f"{name}.json").write_text(json.dumps(record))
        assert reap_orphaned_services(run_dir) == ["orphan"]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert adopted.poll() is None and reused.poll() is None
        assert sorted(p.name for p in run_dir.iterdir()) == ["adopted.json"]
    finally:
        for process in (orphan, adopted, reused):
            process.kill()
            process.wait()
