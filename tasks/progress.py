"""A grid run's progress while its jobs train: polled from MLflow, shown in the CLI and the Prefect UI."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.artifacts import artifact_key
from transfusion import tracking
from transfusion.config import JobSpec
from transfusion.progress import GridProgress, JobProgress, format_seconds

log = logging.getLogger(__name__)

# Seconds between polls of the tracking server: a few requests per running job each time.
POLL_INTERVAL_S = 2.0


def job_label(spec: JobSpec) -> str:
    """``cbr-tiny random 160 seed 0``: how progress lines and task runs name a job."""
    return f"{spec.model} {spec.init_label} {spec.data_size} seed {spec.seed}"


class GridProgressArtifact:
    """The grid's Prefect progress artifact: percent of jobs finished, ETA in its description."""

    def __init__(self, grid: str, total: int) -> None:
        self.total = total
        self._id = None
        try:
            self._id = create_progress_artifact(
                0.0, key=artifact_key(grid, "progress"), description=f"grid {grid}: 0 of {total} jobs finished"
            )
        except Exception:  # outside a flow run there is nowhere to show it
            log.debug("no progress artifact", exc_info=True)

    def update(self, progress: GridProgress) -> None:
        if self._id is None:
            return
        done = progress.finished
        eta = format_seconds(progress.eta_seconds()) if done < self.total else "done"
        update_progress_artifact(
            self._id,
            100.0 * done / max(1, self.total),
            description=f"grid {progress.grid}: {done} of {self.total} jobs finished; ETA {eta}",
        )


@contextlib.contextmanager
def watch_grid(grid: str, jobs: list[JobSpec], grid_run: tracking.GridRun) -> Iterator[GridProgress]:
    """A :class:`GridProgress` of ``jobs`` kept current from MLflow while the block runs."""
    progress = GridProgress(grid, {s.job_key: JobProgress(job_label(s), s.train.steps) for s in jobs})
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_INTERVAL_S):
            try:
                for job in tracking.running_jobs(grid_run.experiment_id, grid_run.run_id):
                    progress.observe(job.job_key, step=job.step, val_auc=job.val_auc)
            except Exception:  # the next poll tries again; progress is never worth failing a grid
                log.debug("progress poll failed", exc_info=True)

    thread = threading.Thread(target=poll, name=f"progress-{grid}", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join(timeout=10)
