"""A grid's plan, status and export: the rules in microseconds, then the CLI against a real MLflow server.

The tracked runs here are made with the tracking module's own calls (``create_job_run``,
``end_run``) on the session's MLflow server, so ``status``, ``export``, ``plan`` and the
scheduled no-op read exactly what a trained grid leaves, without training one.
"""

from __future__ import annotations

import re
import uuid

import pytest

from flows.cli import main
from tests.conftest import run_cli
from transfusion.config import (
    PLACEMENT_FIELDS,
    JobSpec,
    TrainSettings,
    cuda_device_count,
    load_grid,
    variant_name,
)
from transfusion.grid_status import JobState, RunView, grid_status, job_status, missing_jobs_line
from transfusion.plan import DEVICES, format_plan, model_cost, plan_grid, probe_bytes

SMOKE = load_grid("smoke")
SPEC = SMOKE.jobs()[0]


def _run(status: str, start: int, *, reason: str = "", device_s: float | None = None) -> RunView:
    return RunView(f"r{start}", SPEC.job_key, status, reason, device_s, start_time_ms=start, end_time_ms=start + 1)


# --- status rules -----------------------------------------------------------------------


def test_a_job_without_runs_is_pending_for_that_reason():
    status = job_status(SPEC, [])
    assert (status.state, status.reason) == (JobState.PENDING, "no run yet")


def test_a_finished_run_wins_over_a_newer_failed_attempt():
    status = job_status(SPEC, [_run("FAILED", 2, reason="NaN loss"), _run("FINISHED", 1)])
    assert status.state is JobState.FINISHED and status.run.run_id == "r1"


def test_the_newest_run_decides_running_failed_and_killed():
    assert job_status(SPEC, [_run("RUNNING", 3), _run("FAILED", 1)]).state is JobState.RUNNING
    failed = job_status(SPEC, [_run("FAILED", 3, reason="ValueError: NaN loss")])
    assert (failed.state, failed.reason) == (JobState.FAILED, "ValueError: NaN loss")
    killed = job_status(SPEC, [_run("KILLED", 3, reason="interrupted by SIGINT")])
    assert killed.state is JobState.PENDING and "interrupted by SIGINT" in killed.reason


def test_a_finished_run_the_rule_refuses_leaves_the_job_pending_with_the_rule_s_reason():
    status = job_status(SPEC, [_run("FINISHED", 1)], counts=lambda spec, run: "trained on data version 1")
    assert status.state is JobState.PENDING
    assert status.reason == "its finished run does not count: trained on data version 1"


def test_grid_status_counts_and_sums_device_seconds_of_counted_runs():
    first, second = SMOKE.jobs()
    runs = {
        first.job_key: [_run("FINISHED", 5, device_s=30.0)],
        second.job_key: [RunView("x", second.job_key, "RUNNING", start_time_ms=9)],
    }
    status = grid_status("smoke", SMOKE.jobs(), runs)
    assert [s.state for s in status.jobs] == [JobState.FINISHED, JobState.RUNNING]
    assert status.counts_line == "2 jobs: 1 finished, 1 running, 0 failed, 0 pending"
    assert status.spent_device_s == 30.0
    assert status.last_finished_ms == 6


def test_missing_jobs_line_names_the_missing_jobs_or_nothing():
    jobs = SMOKE.jobs()
    assert missing_jobs_line(jobs, {j.job_key for j in jobs}) is None
    line = missing_jobs_line(jobs, {jobs[0].job_key})
    assert line == f"Incomplete: 1 of 2 jobs finished; missing 1: {jobs[1].run_name}."


# --- variants and GPUs by default ---------------------------------------------------------


def test_variant_names_hash_what_is_trained_in_any_order():
    a = variant_name("smoke", {"train.steps": 40, "seeds": [0]})
    assert re.fullmatch(r"smoke\+[0-9a-f]{8}", a)
    assert variant_name("smoke", {"seeds": [0], "train.steps": 40}) == a
    assert variant_name("smoke", {"train.steps": 41, "seeds": [0]}) != a
    # Where jobs run, how they are analysed and retried: the same grid, the same name.
    same = {f"train.{field}": 1 for field in PLACEMENT_FIELDS} | {"convergence_threshold": 0.8, "max_retries": 3}
    assert variant_name("smoke", same) == "smoke"


def test_gpus_per_job_auto_resolves_to_this_machine_and_keeps_job_keys():
    assert TrainSettings().gpus_per_job == float(cuda_device_count() > 0)
    assert TrainSettings(gpus_per_job="auto").gpus_per_job == TrainSettings().gpus_per_job
    explicit = JobSpec.model_validate({**SPEC.model_dump(), "train": {**SPEC.train.model_dump(), "gpus_per_job": 0}})
    assert explicit.job_key == SPEC.job_key
    with pytest.raises(ValueError):
        TrainSettings(gpus_per_job="some")


# --- the plan -------------------------------------------------------------------------------


def test_probe_bytes_keep_rows_per_channel_positions_per_image():
    # 16 channels on 4 x 4 at 8 images: ceil(10 x 16 / 8) = 20 > 16 positions, so all 16 per image.
    conv = probe_bytes({"stage1": (1, 16, 4, 4)}, 8, 10)
    assert conv == 8 * 16 * (16 * 2 + 12)
    assert probe_bytes({"pool": (1, 32)}, 8, 10) == 8 * 32 * 2


def test_plan_of_the_smoke_grid_adds_up_and_prices_device_hours():
    plan = plan_grid(SMOKE, device="cpu")
    assert len(plan.jobs) == 2
    assert plan.total_flops == pytest.approx(sum(job.train_flops for job in plan.jobs))
    job = plan.jobs[0]
    forward = model_cost("cbr-tiny", resolution=64, probe_size=160, rows_per_channel=10).forward_flops
    assert job.train_flops == pytest.approx(3 * forward * SMOKE.train.steps * SMOKE.train.batch_size)
    assert job.hours == pytest.approx(job.train_flops / (job.throughput.flops_per_s * job.devices) / 3600)
    assert plan.price == pytest.approx(plan.device_hours * DEVICES["cpu"].price_per_hour)
    doubled = plan_grid(SMOKE, device="cpu", price_per_hour=2 * DEVICES["cpu"].price_per_hour)
    assert doubled.price == pytest.approx(2 * plan.price)
    assert not job.throughput.measured and "assumed" in job.throughput.basis  # cbr-tiny has no CPU figure
    measured = plan_grid(load_grid("demo"), device="cpu").jobs
    assert any(j.throughput.measured for j in measured if j.spec.model == "cbr-small")
    text = format_plan(plan)
    assert "finished: unknown (no tracking server)" in text
    assert "Resolved grid (every default filled in):" in text and "gpus_per_job:" in text


def test_plan_refuses_an_unknown_device_and_a_negative_price():
    with pytest.raises(ValueError, match="unknown device 'tpu'; valid: a100, h100, l4, a10g, cpu"):
        plan_grid(SMOKE, device="tpu")
    with pytest.raises(ValueError, match="price per hour must be a number >= 0"):
        plan_grid(SMOKE, device="cpu", price_per_hour=-1.0)


def test_plan_full_grid_on_a100_prints_jobs_flops_hours_and_price(tmp_path):
    result = run_cli("plan", "full-grid", "--gpu", "a100", home=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Jobs: 108 in total; finished: unknown (no tracking server)" in out
    assert re.search(r"Training FLOPs: [\d.]+ EFLOP in total", out), out
    hours = float(re.search(r"Estimate: ([\d.]+) a100 card-hours for all 108 jobs", out).group(1))
    price = float(re.search(r"Price: \$([\d,]+) for all jobs", out).group(1).replace(",", ""))
    assert hours > 0 and price == pytest.approx(hours * DEVICES["a100"].price_per_hour, abs=1)
    assert "| resnet50 | 18 |" in out and "assumed: 35% of the dense bf16 peak" in out
    assert "Disk: probes" in out and "checkpoints up to" in out and "node cache" in out
    # Nothing was started or written: no tracking store, no prepared data.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()


# --- status, export and plan against a real tracking server ---------------------------------


@pytest.fixture
def tracked_smoke(mlflow_server, monkeypatch):
    """The smoke grid's two jobs in MLflow: one FINISHED (with time/device_s), one FAILED."""
    from transfusion import tracking

    grid = load_grid({**SMOKE.model_dump(mode="json"), "name": f"smoke-tracked-{uuid.uuid4().hex[:8]}"})
    parent = tracking.open_grid_run(grid)
    experiment = parent.experiment_id
    done, broken = grid.jobs()
    run_id = tracking.create_job_run(done, experiment_id=experiment, parent_run_id=parent.run_id)
    tracking.log_metrics(run_id, {"test/auc": 0.9, tracking.DEVICE_SECONDS: 7200.0}, step=6)
    tracking.end_run(run_id, "FINISHED")
    failed = tracking.create_job_run(broken, experiment_id=experiment, parent_run_id=parent.run_id)
    tracking.end_run(failed, "FAILED", reason="ValueError: NaN loss at step 3")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return grid, done, broken, parent


def _grid_file(tmp_path, grid) -> str:
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid.model_dump(mode="json")))
    return str(path)


def test_status_lists_finished_and_failed_jobs_with_reasons(tracked_smoke, tmp_path, capsys):
    grid, done, broken, _ = tracked_smoke
    assert main(["status", _grid_file(tmp_path, grid)]) == 0
    out = capsys.readouterr().out
    assert "2 jobs: 1 finished, 0 running, 1 failed, 0 pending" in out
    # Shown under its key by content (the run was recorded under its key by names, which still counts).
    assert re.search(rf"{re.escape(broken.run_name)} +\[[0-9a-f]{{16}}\] +ValueError: NaN loss at step 3", out), out
    assert done.run_name in out


def test_plan_of_a_tracked_grid_counts_finished_and_sets_the_estimate_beside_what_was_spent(
    tracked_smoke, tmp_path, capsys
):
    grid, _, broken, _ = tracked_smoke
    assert main(["plan", _grid_file(tmp_path, grid), "--gpu", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Jobs: 2 in total, 1 already finished, 1 pending" in out
    assert "not finished, ValueError: NaN loss at step 3: 1" in out
    assert "Spent: 2.00 device-hours logged by 1 finished jobs" in out


def test_export_writes_one_row_per_run_with_identity_metrics_and_tags(tracked_smoke, tmp_path, capsys):
    import pandas as pd

    grid, done, _, _ = tracked_smoke
    ref = _grid_file(tmp_path, grid)
    for fmt, read in (("csv", pd.read_csv), ("parquet", pd.read_parquet)):
        out = tmp_path / f"runs.{fmt}"
        assert main(["export", ref, "--format", fmt, "--out", str(out)]) == 0
        frame = read(out)
        assert len(frame) == 2
        assert {"run_id", "status", "params.model", "params.seed", "params.train.steps", "tags.job_key"} <= set(
            frame.columns
        )
        assert sorted(frame["status"]) == ["FAILED", "FINISHED"]
        row = frame[frame["tags.job_key"] == done.job_key].iloc[0]
        assert row["metrics.test/auc"] == pytest.approx(0.9)
    assert "2 runs of grid" in capsys.readouterr().out


def test_a_scheduled_run_of_a_finished_grid_ends_with_one_line(tracked_smoke):
    from tasks.training import unchanged_since_task
    from transfusion import tracking
    from transfusion.grid_status import grid_status as status_of

    grid, _, broken, _ = tracked_smoke
    assert unchanged_since_task.fn(grid) is None  # one job failed: there is work to do
    experiment = tracking.experiment_id_for(grid.name)
    run_id = tracking.create_job_run(broken, experiment_id=experiment, parent_run_id=None)
    tracking.end_run(run_id, "FINISHED")
    line = unchanged_since_task.fn(grid)
    assert re.fullmatch(r"0 pending: nothing changed since \d{4}-\d\d-\d\d \d\d:\d\d UTC", line), line
    assert status_of(grid.name, grid.jobs(), tracking.grid_job_runs(grid.name)).count(JobState.FINISHED) == 2


def test_run_id_names_the_grid_its_parent_run_was_opened_for(tracked_smoke, capsys):
    grid, done, _, parent = tracked_smoke
    assert main(["status", "--run-id", parent.run_id]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Grid {grid.name} (") and "1 finished" in out
    assert main(["status", "--run-id", done.job_key]) == 2  # not a run id
    assert "no such run" in capsys.readouterr().err


def test_a_job_holds_its_gpus_or_else_its_cpus_times_its_workers():
    from tasks.training import devices_held

    def spec(**train):
        return JobSpec.model_validate({**SPEC.model_dump(), "train": {**SPEC.train.model_dump(), **train}})

    assert devices_held(spec(gpus_per_job=0, cpus_per_job=4, num_workers=2)) == 8
    assert devices_held(spec(gpus_per_job=0.5, cpus_per_job=4, num_workers=2)) == 1.0
