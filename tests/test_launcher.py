"""Jobs through Ray Train on warm pool members, logging to a real MLflow server."""

import threading

import pytest
import ray

from transfusion import tracking
from transfusion.config import JobSpec, TrainSettings
from transfusion.job_broker import AfterError, JobStatus, Restart
from transfusion.launcher import (
    JobBroker,
    JobFailedError,
    JobPool,
    LaunchRequest,
    checkpoints_for,
    fit_job,
    scaling_for,
)
from transfusion.metrics import RunPredictions, roc_auc

pytestmark = pytest.mark.slow


def _spec(seed: int, *, steps: int = 6, max_failures: int = 1, num_workers: int = 1) -> JobSpec:
    return JobSpec(
        grid="launcher-test", model="cbr-tiny", init="random", dataset="synthetic-retina", data_size=120, seed=seed,
        dataset_options={"train": 240, "val": 64, "test": 64},
        train=TrainSettings(steps=steps, batch_size=16, eval_every=3, resolution=32, probe_size=16,
                            max_failures=max_failures, num_workers=num_workers),
    )  # fmt: skip


def _request(spec: JobSpec, dataset_root, **faults) -> LaunchRequest:
    experiment_id = tracking.ensure_experiment(spec.grid)
    run_id = tracking.create_job_run(spec, experiment_id=experiment_id, parent_run_id=None)
    return LaunchRequest(spec=spec.model_dump(mode="json"), run_id=run_id, tracking_uri=tracking.tracking_uri(),
                         dataset_root=str(dataset_root), source_uri=None, **faults)  # fmt: skip


def test_one_job_through_ray_train(mlflow_server, ray_cluster, tiny_retina, tmp_path):
    spec = _spec(3)
    request = _request(spec, tiny_retina.root)
    metrics = fit_job(request, storage_path=str(tmp_path / "ray"))
    assert metrics["steps"] == 6
    # The logged AUC is the AUC of the test predictions the job stored beside it.
    stored = RunPredictions.load(tracking.download_artifact(request.run_id, "predictions/test.npz", tmp_path))
    assert metrics["test/auc"] == pytest.approx(roc_auc(stored.targets[:, 0], stored.scores[:, 0]), abs=1e-9)
    assert metrics["time/launch_s"] > 0 and metrics["time/setup_s"] > 0 and metrics["time/finish_s"] > 0
    assert tracking.metric_history(request.run_id, "val/auc")[-1][0] == 6
    assert tracking.client().get_run(request.run_id).data.metrics["test/auc"] == pytest.approx(metrics["test/auc"])
    # A checkpoint at each evaluation (steps 3 and 6), in the folder of this run of the job.
    state = checkpoints_for(spec, str(tmp_path / "ray"), request.run_id).latest()
    assert state["step"] == 6 and state["run_id"] == request.run_id
    folder = tmp_path / "ray" / "jobs" / f"{spec.grid}-{spec.job_key}" / request.run_id
    assert sorted(p.name for p in folder.iterdir()) == ["state-00000003.pt", "state-00000006.pt"]


def test_pool_runs_jobs_on_warm_members_and_outlives_a_failed_job(mlflow_server, ray_cluster, tiny_retina, tmp_path):
    storage = tmp_path / "ray"
    pool = JobPool(scaling_for(_spec(0)), str(storage), slots=2, name="pool-test")
    nan_at_step_2 = {1: {"fault_at_step": 2}}  # the second job's loss turns NaN
    requests = [_request(_spec(seed), tiny_retina.root, **nan_at_step_2.get(seed, {})) for seed in range(4)]
    results: dict[int, object] = {}

    def run(seed: int) -> None:
        try:
            results[seed] = pool.run(requests[seed])
        except JobFailedError as exc:
            results[seed] = exc

    try:
        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        pool.close()
    assert isinstance(results[1], JobFailedError) and "NonFiniteLossError" in str(results[1])
    for seed in (0, 2, 3):
        assert results[seed]["steps"] == 6, results[seed]
        assert tracking.client().get_run(requests[seed].run_id).data.metrics["test/auc"] == pytest.approx(
            results[seed]["test/auc"]
        )
    # Four jobs, at most two at a time, on two Ray Train runs: members took jobs one after another.
    member_runs = sorted(p.name for p in storage.iterdir() if p.name.startswith("pool-test-m"))
    assert member_runs == ["pool-test-m0", "pool-test-m1"]


def test_two_worker_jobs_share_one_process_group_one_after_another(mlflow_server, ray_cluster, tiny_retina, tmp_path):
    # Both workers of the member get each job from rank 0 and train it with DDP (gloo on CPU);
    # a NaN loss stops both ranks together and the member goes on to the next job.
    storage = tmp_path / "ray"
    specs = [_spec(seed, num_workers=2) for seed in (7, 8, 9)]
    requests = [_request(spec, tiny_retina.root, **({"fault_at_step": 2} if spec.seed == 8 else {})) for spec in specs]
    pool = JobPool(scaling_for(specs[0]), str(storage), slots=1, name="ddp-test")
    try:
        first = pool.run(requests[0])
        with pytest.raises(JobFailedError, match="NonFiniteLossError"):
            pool.run(requests[1])
        last = pool.run(requests[2])
    finally:
        pool.close()
    assert first["steps"] == last["steps"] == 6
    assert first["test/auc"] != last["test/auc"]  # different seeds, different models
    assert sorted(p.name for p in storage.iterdir() if p.name.startswith("ddp-test")) == ["ddp-test-m0"]
    for spec, request in zip(specs[::2], requests[::2], strict=True):
        assert checkpoints_for(spec, str(storage), request.run_id).latest()["step"] == 6


@pytest.fixture()
def broker(ray_cluster):
    handle = JobBroker.options(max_concurrency=100).remote(slots=1, idle_timeout_s=3.0)
    yield handle
    ray.kill(handle)


def _job(run_id: str, max_failures: int = 1) -> dict:
    return {"run_id": run_id, "spec": {"train": {"max_failures": max_failures}}}


def test_broker_actor_forwards_to_its_rules_and_wakes_waiting_members(broker):
    # The rules themselves are tested without Ray in test_job_broker.py; here only the waiting.
    call = lambda method, *args: ray.get(getattr(broker, method).remote(*args))  # noqa: E731
    assert call("resume", 0) == Restart(0)  # an unknown member has nothing to resume
    assert call("submit", _job("a")) == [0]
    assert call("resume", 0) == Restart(1)
    outcome = broker.result.remote("a")  # waits until the job ends
    assert call("next_job", 0, 1)["run_id"] == "a"
    waiting = broker.next_job.remote(0, 1)  # nothing queued: waits ...
    call("finish", 0, 1, {"steps": 6.0})
    end = ray.get(outcome)
    assert end.status is JobStatus.FINISHED and end.metrics == {"steps": 6.0} and end.launch_s >= 0
    assert call("submit", _job("b")) == []  # ... and wakes for the next job
    assert ray.get(waiting)["run_id"] == "b"
    assert call("job_error", 0, 1, "ValueError: bad", False) is AfterError.NEXT_JOB
    assert ray.get(broker.result.remote("b")).reason == "ValueError: bad"
    assert call("next_job", 0, 1) is None  # idle past the timeout: the member retires


def test_warm_workers_go_when_the_last_flow_using_them_stops(monkeypatch):
    import tasks.training as training
    import transfusion.launcher as launcher

    closed = []
    monkeypatch.setattr(launcher, "close_pools", lambda: closed.append(True))
    monkeypatch.setattr(training, "_COMPUTE_USERS", [2])  # two flows of this process started compute
    training.stop_compute_task.fn()
    assert closed == []  # the other flow's jobs keep their workers
    training.stop_compute_task.fn()
    assert closed == [True]
