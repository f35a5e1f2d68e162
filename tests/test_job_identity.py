"""Job identity against a real tracking server: placement changes and old stores retrain nothing."""

from __future__ import annotations

import pytest

from transfusion import tracking
from transfusion.config import GridSpec, TrainSettings

pytestmark = pytest.mark.slow


def _grid(**train) -> GridSpec:
    return GridSpec(
        name="identity", dataset="synthetic-retina", models=["cbr-tiny"], inits=["random"], data_sizes=[1000],
        seeds=[2], train=TrainSettings(steps=40, resolution=32, cpus_per_job=2, **train),
    )  # fmt: skip


def _finished_run_tagged(grid: GridSpec, grid_run: tracking.GridRun, job_key: str) -> str:
    spec = grid.jobs()[0]
    run_id = tracking.create_job_run(spec, experiment_id=grid_run.experiment_id, parent_run_id=grid_run.run_id)
    tracking.set_tags(run_id, {"job_key": job_key})
    tracking.end_run(run_id, "FINISHED")
    return run_id


def test_store_written_with_version_1_keys_is_found_and_not_retrained(mlflow_server):
    from tasks.training import pending_jobs_task

    grid = _grid()
    grid_run = tracking.open_grid_run(grid)
    assert pending_jobs_task.fn(grid, grid_run) == 1
    # The key the code before placement-free keys wrote for this job (pinned in test_config).
    old_run = _finished_run_tagged(grid, grid_run, "67c85b535ca74d5c")
    assert pending_jobs_task.fn(grid, grid_run) == 0
    assert tracking.find_finished_run(grid_run.experiment_id, grid.jobs()[0].lookup_keys).info.run_id == old_run


def test_moving_a_finished_grid_to_other_resources_retrains_nothing(mlflow_server):
    from tasks.training import pending_jobs_task

    grid = _grid().model_copy(update={"name": "identity-moved"})
    grid_run = tracking.open_grid_run(grid)
    _finished_run_tagged(grid, grid_run, grid.jobs()[0].job_key)
    on_gpus = grid.model_copy(update={"train": grid.train.model_copy(update={"gpus_per_job": 1.0, "max_failures": 4})})
    assert on_gpus.jobs()[0].job_key == grid.jobs()[0].job_key
    assert pending_jobs_task.fn(on_gpus, grid_run) == 0
    longer = grid.model_copy(update={"train": grid.train.model_copy(update={"steps": 41})})
    assert pending_jobs_task.fn(longer, grid_run) == 1
