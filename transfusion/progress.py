"""Where a running grid stands: each job's step, latest validation AUC and speed, the grid's ETA.

Plain data fed by whoever watches the jobs (the flow polls the tracking server) and
read by whoever shows it: the CLI's live table, plain log lines, a Prefect progress
artifact. Listeners registered with :func:`add_listener` hear every change; with none,
lines go to the log.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

log = logging.getLogger(__name__)


class JobState(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class JobProgress:
    """One job: its steps so far and how fast they come."""

    name: str
    steps: int
    state: JobState = JobState.QUEUED
    step: int = 0
    val_auc: float = math.nan
    steps_per_s: float = math.nan
    _seen: tuple[float, int] | None = field(default=None, repr=False)

    @property
    def remaining_steps(self) -> int:
        return 0 if self.state in (JobState.DONE, JobState.FAILED) else max(0, self.steps - self.step)


@dataclass
class GridProgress:
    """Every job of one grid run, keyed by ``job_key``; safe to update from several threads."""

    grid: str
    jobs: dict[str, JobProgress]
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def finished(self) -> int:
        return sum(j.state in (JobState.DONE, JobState.FAILED) for j in self.jobs.values())

    @property
    def running(self) -> list[JobProgress]:
        return [j for j in self.jobs.values() if j.state is JobState.RUNNING]

    def observe(self, job_key: str, *, step: int, val_auc: float | None, now: float | None = None) -> None:
        """A running job was seen at ``step``; its speed comes from the step before."""
        now = time.monotonic() if now is None else now
        with self._lock:
            job = self.jobs.get(job_key)
            if job is None or job.state in (JobState.DONE, JobState.FAILED):
                return
            job.state = JobState.RUNNING
            if job._seen is not None and step > job._seen[1] and now > job._seen[0]:
                job.steps_per_s = (step - job._seen[1]) / (now - job._seen[0])
            if job._seen is None or step != job._seen[1]:
                job._seen = (now, step)
            job.step = step
            if val_auc is not None and not math.isnan(val_auc):
                job.val_auc = val_auc
        _notify(self)

    def finish(self, job_key: str, *, ok: bool, line: str) -> None:
        with self._lock:
            job = self.jobs.get(job_key)
            if job is not None:
                job.state = JobState.DONE if ok else JobState.FAILED
                job.step = job.steps if ok else job.step
        _announce(self, line)

    def eta_seconds(self) -> float | None:
        """Seconds until every job is done at the current pace; None before any pace is known.

        Pace is the sum of the running jobs' steps per second, so queued jobs wait for
        the running ones' slots, as they do.
        """
        with self._lock:
            rate = sum(j.steps_per_s for j in self.jobs.values() if j.state is JobState.RUNNING and j.steps_per_s > 0)
            remaining = sum(j.remaining_steps for j in self.jobs.values())
        if remaining == 0:
            return 0.0
        return remaining / rate if rate > 0 else None


def format_seconds(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_running(job: JobProgress) -> str:
    """``step 30/120, val/auc 0.712, 2.3 steps/s`` for one running job."""
    auc = "" if math.isnan(job.val_auc) else f", val/auc {job.val_auc:.3f}"
    speed = "" if math.isnan(job.steps_per_s) else f", {job.steps_per_s:.2f} steps/s"
    return f"step {job.step}/{job.steps}{auc}{speed}"


class ProgressListener:
    """What a display implements; both methods are called from the flow's threads."""

    def changed(self, progress: GridProgress) -> None: ...

    def announce(self, progress: GridProgress, line: str) -> None: ...


class LogLines(ProgressListener):
    """Plain lines (CI logs, served deployments): each finished job, and each running job
    when its step moved, at most every ``every_s`` seconds."""

    def __init__(self, emit: Callable[[str], None], *, every_s: float = 30.0) -> None:
        self._emit = emit
        self._every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}

    def changed(self, progress: GridProgress) -> None:
        now = time.monotonic()
        for key, job in progress.jobs.items():
            when, step = self._last.get(key, (-math.inf, -1))
            if job.state is JobState.RUNNING and job.step != step and now - when >= self._every_s:
                self._last[key] = (now, job.step)
                self._emit(f"  {job.name}: {describe_running(job)}; grid ETA {format_seconds(progress.eta_seconds())}")

    def announce(self, progress: GridProgress, line: str) -> None:
        self._emit(line)


_LISTENERS: list[ProgressListener] = []


def add_listener(listener: ProgressListener) -> None:
    _LISTENERS.append(listener)


def remove_listener(listener: ProgressListener) -> None:
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)


def _notify(progress: GridProgress) -> None:
    for listener in list(_LISTENERS):
        try:
            listener.changed(progress)
        except Exception:  # a display must never stop a grid
            log.debug("progress listener failed", exc_info=True)


def _announce(progress: GridProgress, line: str) -> None:
    if not _LISTENERS:
        print(line, file=sys.stderr, flush=True)
    for listener in list(_LISTENERS):
        try:
            listener.announce(progress, line)
        except Exception:
            log.debug("progress listener failed", exc_info=True)
