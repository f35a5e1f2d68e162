"""Where each job of a grid stands, from the runs the tracking store holds for it.

The rules are plain data: :func:`job_status` turns a job's runs (newest first, as
:func:`transfusion.tracking.grid_job_runs` reads them) into one :class:`JobStatus` with a
reason, and :class:`GridStatus` counts them. ``plan``, ``status``, the reports and the
scheduled runs all read the same answer. Whether a FINISHED run counts for a job is one
pluggable rule (:data:`FinishedRule`): today any FINISHED run under one of the job's
lookup keys does.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transfusion.config import JobSpec


class JobState(enum.Enum):
    FINISHED = "finished"
    RUNNING = "running"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(frozen=True)
class RunView:
    """What the status rules read of one tracked job run."""

    run_id: str
    job_key: str
    status: str  # MLflow's: FINISHED, RUNNING, FAILED, KILLED, SCHEDULED
    reason: str = ""  # the run's failure_reason tag
    device_s: float | None = None  # time/device_s, when the run logged it
    start_time_ms: int = 0
    end_time_ms: int | None = None


# Why a FINISHED run does not count for ``spec`` (None: it counts).
FinishedRule = Callable[[JobSpec, RunView], str | None]


def any_finished_run_counts(spec: JobSpec, run: RunView) -> str | None:
    """Today's rule: a FINISHED run under one of the job's lookup keys counts."""
    return None


@dataclass(frozen=True)
class JobStatus:
    spec: JobSpec
    state: JobState
    reason: str  # one line: why pending, why failed, or which run finished
    run: RunView | None = None


def job_status(spec: JobSpec, runs: Sequence[RunView], *, counts: FinishedRule = any_finished_run_counts) -> JobStatus:
    """The state of ``spec`` given its runs, newest first (runs under any of its lookup keys).

    A counted FINISHED run wins over any newer attempt; otherwise the newest run decides:
    RUNNING is running, FAILED is failed with its reason, KILLED (an interrupt) is pending,
    and no run at all is pending.
    """
    refused = []
    for run in runs:
        if run.status != "FINISHED":
            continue
        why_not = counts(spec, run)
        if why_not is None:
            return JobStatus(spec, JobState.FINISHED, f"run {run.run_id}", run)
        refused.append(why_not)
    newest = runs[0] if runs else None
    if newest is not None and newest.status == "RUNNING":
        return JobStatus(spec, JobState.RUNNING, f"run {newest.run_id}", newest)
    if newest is not None and newest.status == "FAILED":
        return JobStatus(spec, JobState.FAILED, newest.reason or "failed (no reason recorded)", newest)
    if refused:
        return JobStatus(spec, JobState.PENDING, f"its finished run does not count: {refused[0]}", newest)
    if newest is not None and newest.status == "KILLED":
        return JobStatus(spec, JobState.PENDING, f"interrupted ({newest.reason or 'killed'}); continues", newest)
    return JobStatus(spec, JobState.PENDING, "no run yet", newest)


@dataclass(frozen=True)
class GridStatus:
    grid: str
    jobs: tuple[JobStatus, ...]

    def count(self, state: JobState) -> int:
        return sum(job.state is state for job in self.jobs)

    def of(self, state: JobState) -> list[JobStatus]:
        return [job for job in self.jobs if job.state is state]

    @property
    def counts_line(self) -> str:
        counts = Counter(job.state for job in self.jobs)
        parts = ", ".join(f"{counts[state]} {state.value}" for state in JobState)
        return f"{len(self.jobs)} jobs: {parts}"

    @property
    def spent_device_s(self) -> float:
        """Device-seconds the counted FINISHED runs logged (runs from before ``time/device_s`` add nothing)."""
        return sum(job.run.device_s or 0.0 for job in self.of(JobState.FINISHED) if job.run is not None)

    @property
    def last_finished_ms(self) -> int | None:
        ends = [job.run.end_time_ms for job in self.of(JobState.FINISHED) if job.run and job.run.end_time_ms]
        return max(ends, default=None)


def grid_status(
    grid: str,
    jobs: Sequence[JobSpec],
    runs_by_key: dict[str, list[RunView]],
    *,
    counts: FinishedRule = any_finished_run_counts,
) -> GridStatus:
    """Every job's status; ``runs_by_key`` maps a lookup key to its runs, newest first."""
    statuses = []
    for spec in jobs:
        runs = [run for key in spec.lookup_keys for run in runs_by_key.get(key, [])]
        runs.sort(key=lambda run: run.start_time_ms, reverse=True)
        statuses.append(job_status(spec, runs, counts=counts))
    return GridStatus(grid, tuple(statuses))


def missing_jobs_line(jobs: Sequence[JobSpec], found_keys: set[str], *, shown: int = 6) -> str | None:
    """One line naming the jobs a report lacks (None when it has them all)."""
    missing = [spec.run_name for spec in jobs if spec.job_key not in found_keys]
    if not missing:
        return None
    names = ", ".join(missing[:shown]) + (f" and {len(missing) - shown} more" if len(missing) > shown else "")
    return f"Incomplete: {len(jobs) - len(missing)} of {len(jobs)} jobs finished; missing {len(missing)}: {names}."
