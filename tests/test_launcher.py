"""One job through Ray Train, logging to a real MLflow server."""

from pathlib import Path

import pytest

from transfusion import tracking
from transfusion.config import JobSpec, TrainSettings
from transfusion.launcher import LaunchRequest, fit_job

pytestmark = pytest.mark.slow


def test_one_job_through_ray_train(mlflow_server, ray_cluster, tiny_retina, tmp_path):
    spec = JobSpec(
        grid="launcher-test", model="cbr-tiny", init="random", dataset="synthetic-retina", data_size=120, seed=3,
        dataset_options={"train": 240, "val": 64, "test": 64},
        train=TrainSettings(steps=6, batch_size=16, eval_every=3, resolution=32, probe_size=16),
    )  # fmt: skip
    experiment_id = tracking.ensure_experiment("launcher-test")
    run_id = tracking.create_job_run(spec, experiment_id=experiment_id, parent_run_id=None)
    request = LaunchRequest(
        spec=spec.model_dump(mode="json"), run_id=run_id, tracking_uri=mlflow_server.url,
        dataset_root=str(tiny_retina.root), source_uri=None,
    )  # fmt: skip
    metrics = fit_job(request, storage_path=str(tmp_path / "ray"))
    assert metrics["steps"] == 6
    assert 0.0 <= metrics["test/auc"] <= 1.0
    assert tracking.metric_history(run_id, "val/auc")[-1][0] == 6
    assert tracking.client().get_run(run_id).data.metrics["test/auc"] == pytest.approx(metrics["test/auc"])
    # Ray Train kept checkpoints (at each evaluation) in the storage path.
    states = list(Path(tmp_path / "ray").rglob("state.pt"))
    assert states, "no Ray Train checkpoint was written"
