"""Faults injected for real: killed workers, NaN losses, restarted servers, concurrent writers, secrets."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import command_env, processes_mentioning, run_cli
from transfusion import tracking
from transfusion.config import JobSpec, TrainSettings
from transfusion.launcher import LaunchRequest, fit_job

pytestmark = pytest.mark.slow
pytest_plugins = ("s3_server",)

SETTINGS = TrainSettings(steps=8, batch_size=16, eval_every=4, checkpoint_every=2, resolution=32, probe_size=16,
                         max_failures=2)  # fmt: skip


def _job(seed: int = 0, grid: str = "faults") -> JobSpec:
    return JobSpec(
        grid=grid, model="cbr-tiny", init="random", dataset="synthetic-retina", data_size=120, seed=seed,
        dataset_options={"train": 240, "val": 64, "test": 64}, train=SETTINGS,
    )  # fmt: skip


def _launch(spec: JobSpec, dataset_root: Path, storage: Path, **faults) -> tuple[str, dict]:
    experiment_id = tracking.ensure_experiment(spec.grid)
    run_id = tracking.create_job_run(spec, experiment_id=experiment_id, parent_run_id=None)
    request = LaunchRequest(spec=spec.model_dump(mode="json"), run_id=run_id, tracking_uri=tracking.tracking_uri(),
                            dataset_root=str(dataset_root), source_uri=None, **faults)  # fmt: skip
    return run_id, fit_job(request, storage_path=str(storage))


def test_killed_worker_resumes_from_checkpoint_in_the_same_run(mlflow_server, ray_cluster, tiny_retina, tmp_path):
    reference_id, reference = _launch(_job(seed=5, grid="faults-reference"), tiny_retina.root, tmp_path / "ref")
    marker = tmp_path / "killed-once"
    run_id, resumed = _launch(
        _job(seed=5), tiny_retina.root, tmp_path / "crash", kill_at_step=5, kill_marker=str(marker)
    )
    assert marker.exists(), "the worker was never killed"
    # Same MLflow run, resumed from the step-4 checkpoint; final metrics as without the crash.
    assert resumed["steps"] == 8
    assert resumed["test/auc"] == pytest.approx(reference["test/auc"], abs=1e-3)
    losses = tracking.metric_history(run_id, "train/loss")
    steps = [s for s, _ in losses]
    assert sorted(set(steps)) == [s for s, _ in tracking.metric_history(reference_id, "train/loss")]
    repeated = sorted(s for s in set(steps) if steps.count(s) > 1)
    # Killed at step 5: at most the steps since the last registered checkpoint (every 2 steps) repeat.
    assert len(repeated) <= SETTINGS.checkpoint_every and all(3 <= s <= 5 for s in repeated), repeated
    evaluated = [s for s, _ in tracking.metric_history(run_id, "val/auc")]
    assert sorted(set(evaluated)) == [0, 4, 8] and all(evaluated.count(s) == 1 or 3 <= s <= 5 for s in evaluated)
    experiment = tracking.client().get_experiment_by_name("faults")
    assert len(tracking.find_job_runs(experiment.experiment_id, _job(seed=5).job_key)) == 1


def _log_points(uri: str, run_id: str, worker: int, steps: int) -> None:
    hooks = tracking.MlflowHooks(run_id, uri=uri)
    for step in range(steps):
        hooks.log_metrics({"train/loss": worker + step / 1000, "val/auc": 0.5 + step / 1000}, step=step)


def test_eight_concurrent_writers_lose_no_metric_point(mlflow_server):
    experiment_id = tracking.ensure_experiment("concurrency")
    runs = [tracking.client().create_run(experiment_id).info.run_id for _ in range(8)]
    # Threads, each with its own client: eight concurrent HTTP writers at the server.
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_log_points, mlflow_server.url, run, i, 40) for i, run in enumerate(runs)]
        for future in futures:
            future.result(timeout=180)
    for i, run in enumerate(runs):
        for key in ("train/loss", "val/auc"):
            history = tracking.metric_history(run, key)
            assert [s for s, _ in history] == list(range(40)), (i, key)


def test_tracking_server_restart_mid_logging_loses_nothing(tmp_path):
    from flows.runtime import free_port, start_mlflow_server

    port = free_port()
    server = start_mlflow_server(tmp_path, port=port)
    uri = server.url
    experiment_id = tracking.ensure_experiment("restart", uri=uri)
    run_id = tracking.client(uri).create_run(experiment_id).info.run_id
    with ThreadPoolExecutor(max_workers=1) as pool:
        writer = pool.submit(_slow_writer, uri, run_id, 30)
        time.sleep(3)
        server.stop()  # the tracking server goes away mid-run ...
        time.sleep(4)
        server = start_mlflow_server(tmp_path, port=port)  # ... and comes back on the same store
        try:
            writer.result(timeout=180)
            assert [s for s, _ in tracking.metric_history(run_id, "train/loss", uri=uri)] == list(range(30))
        finally:
            server.stop()


def _slow_writer(uri: str, run_id: str, steps: int) -> None:
    hooks = tracking.MlflowHooks(run_id, uri=uri)
    for step in range(steps):
        hooks.log_metrics({"train/loss": float(step)}, step=step)
        time.sleep(0.25)


def test_nan_loss_fails_one_job_the_grid_carries_on_and_no_planted_secret_leaks(tmp_path):
    secret = "planted-" + os.urandom(8).hex()
    env = {
        "TRANSFUSION_FAULT": "nan:seed=1:2",
        "AWS_SECRET_ACCESS_KEY": secret,
        "TRANSFUSION_TEST_TOKEN": secret,
        "MY_API_KEY": secret,
        # A temporary Prefect server of its own, whose database is searched too.
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": None,
    }
    result = run_cli("run", "smoke", home=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Grid smoke: 1 trained, 0 already done, 1 failed" in result.stdout
    assert "FAILED: cbr-tiny random 160 seed 1" in result.stdout and "NonFiniteLossError" in result.stdout
    db = sqlite3.connect(tmp_path / "mlflow.db")
    statuses = dict(db.execute(
        "select t.value, r.status from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'seed'"
    ).fetchall())  # fmt: skip
    assert statuses == {"0": "FINISHED", "1": "FAILED"}
    reason = db.execute("select value from tags where key = 'failure_reason'").fetchone()[0]
    assert "NonFiniteLossError" in reason and "step 2" in reason
    db.close()
    # In Prefect the failed job's task run is Failed (the UI shows it red), the other one Completed.
    prefect_db = sqlite3.connect(tmp_path / "prefect" / "prefect.db")
    task_states = dict(prefect_db.execute("select name, state_type from task_run where name like 'train-%'").fetchall())
    prefect_db.close()
    assert sorted(task_states.values()) == ["COMPLETED", "FAILED"], task_states

    # The secrets were in the environment of everything the grid ran; they must be nowhere it wrote.
    assert secret not in result.stdout + result.stderr
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, f"secret leaked into {leaked}"


def _listening_addresses(port: int) -> list[str]:
    """Local addresses listening on ``port``, from /proc/net/tcp{,6} (state 0A = LISTEN)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def test_services_bind_to_loopback_only(tmp_path):
    from flows.runtime import start_mlflow_server

    server = start_mlflow_server(tmp_path)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        addresses = _listening_addresses(port)
        # 127.0.0.1 in /proc's little-endian hex; never 0.0.0.0 (00000000) or ::.
        assert addresses and set(addresses) == {"0100007F"}, addresses
    finally:
        server.stop()


def test_preflight_refuses_an_unreachable_tracking_server_and_a_missing_bucket(s3_server, monkeypatch):
    from flows.runtime import free_port
    from transfusion.preflight import check_storage_path, check_tracking_server

    with pytest.raises(RuntimeError, match=r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable"):
        check_tracking_server(f"http://127.0.0.1:{free_port()}", timeout=2)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.create_bucket("present")
    check_storage_path("s3://present/ray")
    with pytest.raises(RuntimeError, match="S3 bucket 'absent' of storage path s3://absent/ray does not exist"):
        check_storage_path("s3://absent/ray")


def _kill_processes_mentioning(text: str) -> None:
    """Stops what a SIGKILLed run left behind: its MLflow server runs in its own session, and the
    server's uvicorn and job-runner children name the run's home only in their environment."""
    for line in processes_mentioning(text):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def test_interrupted_grid_rerun_skips_finished_resumes_partial_and_never_duplicates(tmp_path):
    from tests.conftest import REPO

    overrides = ["--set", "train.steps=40", "--set", "train.checkpoint_every=5", "--set", "max_concurrent=1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "smoke", *overrides], cwd=REPO, env=command_env(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        for line in process.stdout:
            if line.startswith("[1/2]"):
                break
        _wait_until_running_job_reaches(tmp_path / "mlflow.db", step=12)  # past two checkpoints
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the flow process dies mid-grid, Ray with it
        process.wait()
        _kill_processes_mentioning(str(tmp_path))
    db = sqlite3.connect(tmp_path / "mlflow.db")
    before = db.execute("select status from runs r join tags t on t.run_uuid = r.run_uuid "
                        "where t.key = 'transfusion.role' and t.value = 'job'").fetchall()  # fmt: skip
    db.close()
    assert sorted(s for (s,) in before) == ["FINISHED", "RUNNING"], before

    again = run_cli("run", "smoke", *overrides, home=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    # --set train.steps=... makes a variant of smoke, with its own name (and experiment).
    assert re.search(r"Grid smoke\+[0-9a-f]{8}: 1 trained, 1 already done, 0 failed", again.stdout), again.stdout
    db = sqlite3.connect(tmp_path / "mlflow.db")
    rows = db.execute(
        "select k.value, r.status, coalesce(a.value, '1') from runs r "
        "join tags k on k.run_uuid = r.run_uuid and k.key = 'job_key' "
        "left join tags a on a.run_uuid = r.run_uuid and a.key = 'attempts'"
    ).fetchall()  # fmt: skip
    assert len(rows) == 2 and len({key for key, _, _ in rows}) == 2, rows  # one run per job key
    assert all(status == "FINISHED" for _, status, _ in rows)
    assert sorted(attempts for _, _, attempts in rows) == ["1", "2"]  # the partial job continued in its run
    # ... from its checkpoint, not from scratch: its step-0 evaluation was logged once.
    db = sqlite3.connect(tmp_path / "mlflow.db")
    step0 = db.execute(
        "select count(*) from metrics m join tags a on a.run_uuid = m.run_uuid and a.key = 'attempts' "
        "where a.value = '2' and m.key = 'val/auc' and m.step = 0"
    ).fetchone()[0]  # fmt: skip
    assert step0 == 1


def _wait_until_running_job_reaches(db_path: Path, *, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(db_path) as db:
            (reached,) = db.execute(
                "select coalesce(max(m.step), 0) from metrics m join runs r on r.run_uuid = m.run_uuid "
                "where r.status = 'RUNNING' and m.key = 'train/loss'"
            ).fetchone()  # fmt: skip
        if reached >= step:
            return
        time.sleep(0.5)
    raise TimeoutError(f"no running job reached step {step}")
