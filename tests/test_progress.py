"""Grid progress (speed, ETA, plain lines) and the Prefect report's run links, without servers."""

from __future__ import annotations

import math

import pytest

from transfusion import progress as progress_module
from transfusion.progress import GridProgress, JobProgress, JobState, LogLines, format_seconds


def _grid() -> GridProgress:
    return GridProgress("g", {"a": JobProgress("job a", 100), "b": JobProgress("job b", 100)})


def test_speed_comes_from_successive_observations_and_eta_from_remaining_steps():
    grid = _grid()
    assert grid.eta_seconds() is None  # no pace yet
    grid.observe("a", step=10, val_auc=None, now=0.0)
    grid.observe("a", step=30, val_auc=0.7, now=10.0)
    job = grid.jobs["a"]
    assert job.state is JobState.RUNNING and job.steps_per_s == pytest.approx(2.0) and job.val_auc == 0.7
    # 70 steps left on a, 100 on b (queued), at a's 2 steps/s.
    assert grid.eta_seconds() == pytest.approx(85.0)
    grid.observe("a", step=30, val_auc=math.nan, now=20.0)  # no new step: speed and AUC kept
    assert job.steps_per_s == pytest.approx(2.0) and job.val_auc == 0.7


def test_finished_jobs_count_and_stop_updating():
    grid = _grid()
    grid.finish("a", ok=True, line="a done")
    grid.finish("b", ok=False, line="b failed")
    grid.observe("a", step=5, val_auc=0.5, now=1.0)
    assert grid.finished == 2 and grid.jobs["a"].step == 100 and grid.jobs["b"].state is JobState.FAILED
    assert grid.eta_seconds() == 0.0


def test_plain_lines_say_each_finished_job_and_each_running_job_at_most_every_interval():
    lines: list[str] = []
    listener = LogLines(lines.append, every_s=3600)
    progress_module.add_listener(listener)
    try:
        grid = _grid()
        grid.observe("a", step=10, val_auc=None, now=0.0)
        grid.observe("a", step=20, val_auc=0.61, now=5.0)
        grid.finish("b", ok=True, line="[1/2] job b: test/auc 0.700")
    finally:
        progress_module.remove_listener(listener)
    assert lines == ["  job a: step 10/100; grid ETA ?", "[1/2] job b: test/auc 0.700"]


def test_seconds_read_as_a_person_would_say_them():
    assert [format_seconds(s) for s in (None, 12, 600, 7200)] == ["?", "12 s", "10 min", "2.0 h"]


def test_prefect_report_links_each_cell_to_its_seed_runs():
    from tasks.artifacts import artifact_key, report_markdown
    from transfusion.analysis.records import JobRecord
    from transfusion.analysis.tables import results_table
    from transfusion.tracking import GridRun

    records = [
        JobRecord(f"k{seed}", f"run{seed}", "cbr-tiny", "random", "160", seed, "FINISHED",
                  metrics={"test/auc": 0.6 + seed / 10, "test/auprc": 0.5})
        for seed in (0, 1)
    ]  # fmt: skip
    text = report_markdown(
        "smoke", results_table(records), records, tracking_uri="http://h:5000/", grid_run=GridRun("7", "parent")
    )
    row = next(line for line in text.splitlines() if line.startswith("| cbr-tiny"))
    for seed in (0, 1):
        assert f"[seed {seed}](http://h:5000/#/experiments/7/runs/run{seed}?" in row
    assert "(http://h:5000/#/experiments/7/runs/parent?workflowType=machine_learning)" in text
    assert artifact_key("Full_grid.v2", "results") == "full-grid-v2-results"
