"""Tasks that prepare data, resolve pretrained weights and run training jobs."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from prefect import task

from transfusion import tracking
from transfusion.config import GridSpec, JobSpec
from transfusion.data import prepare_dataset, transfusion_home

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    """What happened to one job of a grid."""

    job_key: str
    spec: JobSpec
    status: str  # FINISHED, SKIPPED (finished earlier), FAILED
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("FINISHED", "SKIPPED")


class JobSlots:
    """Bounds how many jobs run at once in this process (jobs beyond wait their turn)."""

    def __init__(self) -> None:
        self._semaphore = threading.BoundedSemaphore(1)

    def configure(self, count: int) -> None:
        self._semaphore = threading.BoundedSemaphore(max(1, count))

    def __enter__(self) -> None:
        self._semaphore.acquire()

    def __exit__(self, *exc) -> None:
        self._semaphore.release()


JOB_SLOTS = JobSlots()


def storage_path() -> str:
    """Where Ray Train keeps checkpoints: ``$TRANSFUSION_STORAGE_PATH`` or the state dir."""
    return os.environ.get("TRANSFUSION_STORAGE_PATH") or str(transfusion_home() / "ray")


@task(name="start-compute", cache_policy=None)
def start_compute_task(grid: GridSpec) -> int:
    """Starts (or joins) Ray; returns how many of the grid's jobs may run at once."""
    from transfusion.launcher import ensure_ray

    resources = ensure_ray()
    by_cpu = int(resources.get("CPU", 1) // grid.train.cpus_per_job)
    slots = by_cpu
    if grid.train.gpus_per_job > 0:
        slots = min(slots, int(resources.get("GPU", 0) // grid.train.gpus_per_job))
    if grid.max_concurrent:
        slots = min(slots, grid.max_concurrent)
    slots = max(1, slots)
    JOB_SLOTS.configure(slots)
    return slots


@task(name="prepare-dataset", cache_policy=None)
def prepare_dataset_task(grid: GridSpec) -> str:
    """Prepares the grid's dataset once and checks every data size fits its training split."""
    dataset = prepare_dataset(
        grid.dataset,
        source=grid.dataset_source,
        resolution=grid.train.resolution,
        options=grid.dataset_options,
    )
    pool = len(dataset.indices("train"))
    for size in grid.data_sizes:
        if size != "full" and size > pool:
            raise ValueError(
                f"data_size {size} is larger than the {pool} training images of dataset {grid.dataset!r}"
            )
    return str(dataset.root)


@task(name="preflight", cache_policy=None)
def preflight_task(grid: GridSpec) -> None:
    """Fails fast, before any run exists, when a service the grid needs is unreachable."""
    from transfusion.preflight import check_storage_path, check_tracking_server

    check_tracking_server(tracking.tracking_uri())
    check_storage_path(storage_path())


@task(name="open-grid-run", cache_policy=None)
def open_grid_run_task(grid: GridSpec) -> tracking.GridRun:
    return tracking.open_grid_run(grid)


def _resume_candidate(experiment_id: str, spec: JobSpec) -> str | None:
    """An earlier unfinished run of this job to continue, so a re-run adds no duplicate."""
    for run in tracking.find_job_runs(experiment_id, spec.job_key):
        if run.info.status in ("RUNNING", "FAILED", "KILLED", "SCHEDULED"):
            return run.info.run_id
    return None


@task(name="train-job", cache_policy=None, task_run_name="train-{spec.model}-{spec.init}-{spec.data_size}-s{spec.seed}")
def train_job_task(
    spec: JobSpec,
    grid_run: tracking.GridRun,
    dataset_root: str,
    source_uri: str | None = None,
    fault_at_step: int | None = None,
) -> JobOutcome:
    """Runs one job through Ray Train as one MLflow child run; never raises for job failures."""
    from transfusion.launcher import LaunchRequest, fit_job

    started = time.perf_counter()
    done = tracking.find_finished_run(grid_run.experiment_id, spec.job_key)
    if done is not None:
        return JobOutcome(spec.job_key, spec, "SKIPPED", done.info.run_id, dict(done.data.metrics))
    with JOB_SLOTS:
        started = time.perf_counter()
        run_id = _resume_candidate(grid_run.experiment_id, spec)
        if run_id is None:
            run_id = tracking.create_job_run(spec, experiment_id=grid_run.experiment_id, parent_run_id=grid_run.run_id)
        else:
            tracking.reopen_run(run_id)
        if source_uri:
            tracking.log_params(run_id, {"pretrained_uri": source_uri})
        request = LaunchRequest(
            spec=spec.model_dump(mode="json"),
            run_id=run_id,
            tracking_uri=tracking.tracking_uri(),
            dataset_root=dataset_root,
            source_uri=source_uri,
            fault_at_step=fault_at_step,
        )
        try:
            metrics = fit_job(request, storage_path=storage_path())
        except Exception as exc:  # the grid carries on; the run says why it failed
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log.error("job %s failed: %s", spec.job_key, reason)
            try:
                tracking.end_run(run_id, "FAILED", reason=reason)
            except Exception:
                log.exception("could not mark run %s FAILED", run_id)
            return JobOutcome(spec.job_key, spec, "FAILED", run_id, reason=reason, seconds=time.perf_counter() - started)
        total = time.perf_counter() - started
        tracking.log_metrics(run_id, {"time/total_s": total}, step=int(metrics.get("steps", 0)))
        tracking.end_run(run_id, "FINISHED")
        return JobOutcome(spec.job_key, spec, "FINISHED", run_id, metrics, seconds=total)


@task(name="finish-grid-run", cache_policy=None)
def finish_grid_run_task(grid_run: tracking.GridRun, outcomes: list[JobOutcome]) -> None:
    failed = any(o.status == "FAILED" for o in outcomes)
    tracking.end_run(grid_run.run_id, "FAILED" if failed else "FINISHED")
