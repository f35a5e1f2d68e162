"""The rules of the job pool, as plain data: no Ray, no threads, no clock of its own.

A pool has up to ``slots`` *members* (warm worker groups). Each member takes queued jobs
one after another. The rules this module owns:

- hand-out: a queued job goes to the first member that asks; members are started (the
  caller starts them) so that every queued job has one, up to ``slots``;
- attempts: a job may fail ``max_failures`` times (a raised error with a restart left,
  a worker group restarted or gone under it); one failure more and it is given up;
- resume: a member restarted under a job gets that job back (it continues from its
  checkpoint); each (re)start has a number, and a call from an older start is stale;
- retirement: a member idle past its timeout with nothing queued leaves the pool;
- barren members: members that end before taking any job stop being replaced after
  :data:`BARREN_MEMBER_LIMIT` in a row, and the queued jobs fail;
- close: queued jobs fail, members stop at their next question.

:class:`transfusion.launcher.JobBroker` is the Ray actor that forwards to
:class:`JobBrokerState` and adds the waiting; tests drive this class directly.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Members in a row whose worker group ended before they took any job: then the queued
# jobs fail instead of starting members forever (e.g. workers that cannot even start).
BARREN_MEMBER_LIMIT = 3


class JobStatus(enum.Enum):
    FINISHED = "FINISHED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class JobEnd:
    """How a job ended: its final metrics, or why it failed."""

    status: JobStatus
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    launch_s: float | None = None  # queued until a member first took it

    @property
    def failed(self) -> bool:
        return self.status is JobStatus.FAILED


@dataclass(frozen=True)
class Restart:
    """What a member learns at each (re)start: its start number and the job to continue."""

    start: int
    request: dict[str, Any] | None = None


@dataclass(frozen=True)
class Handout:
    """The answer to a member asking for work: a job, nothing yet (ask again), or stop."""

    request: dict[str, Any] | None = None
    stop: bool = False

    @property
    def waiting(self) -> bool:
        return self.request is None and not self.stop


WAIT = Handout()
STOP = Handout(stop=True)


class AfterError(enum.Enum):
    """What a member does after its job raised."""

    RESTART = "restart"  # the job has an attempt left: let the worker group restart
    NEXT_JOB = "next-job"  # the job is failed (or the caller is stale): carry on


@dataclass
class Job:
    run_id: str
    request: dict[str, Any]
    max_failures: int
    submitted: float
    picked: float | None = None
    failures: int = 0
    reason: str | None = None
    end: JobEnd | None = None


@dataclass
class Member:
    job: str | None = None  # run_id of the job it is running
    starts: int = 0  # (re)starts of its worker group: a call from an older start is stale
    served: int = 0


class JobBrokerState:
    """Jobs, members and their attempts; every method is one atomic step of the pool."""

    def __init__(self, *, slots: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self._clock = clock
        self._queue: deque[str] = deque()
        self.jobs: dict[str, Job] = {}
        self.members: dict[int, Member] = {}
        self._next_member = 0
        self._barren = 0
        self.closed = False

    # --- the pool's owner --------------------------------------------------------

    def submit(self, request: dict[str, Any], *, max_failures: int) -> list[int]:
        """Queues a job; returns the members the caller must start for it."""
        if self.closed:
            raise RuntimeError("the job pool is closed")
        run_id = request["run_id"]
        self.jobs[run_id] = Job(run_id, request, max_failures, submitted=self._clock())
        self._queue.append(run_id)
        return self._members_to_start()

    def outcome(self, run_id: str) -> JobEnd | None:
        """How the job ended, or None while it is queued or running."""
        return self.jobs[run_id].end

    def forget(self, run_id: str) -> None:
        self.jobs.pop(run_id, None)

    def close(self) -> None:
        """Fails the queued jobs; members stop when they next ask for work."""
        self.closed = True
        for run_id in self._queue:
            self._end(run_id, JobEnd(JobStatus.FAILED, reason="the job pool was closed before the job started"))
        self._queue.clear()

    def member_gone(self, member: int, reason: str | None) -> list[int]:
        """A member's worker group ended: its job is queued again while it has an attempt
        left (else it fails); returns the members to start."""
        state = self.members.pop(member, None)
        if state is not None and state.job is not None:
            job = self.jobs[state.job]
            job.failures += 1
            job.reason = job.reason or f"the Ray Train worker group stopped: {reason or 'no reason given'}"
            if job.failures <= job.max_failures and not self.closed:
                self._queue.appendleft(job.run_id)
            else:
                self._give_up(job)
        elif state is not None and state.served == 0 and reason is not None:
            self._barren += 1
            if self._barren >= BARREN_MEMBER_LIMIT:
                why = f"{self._barren} pool members in a row failed before taking a job: {reason}"
                failure = JobEnd(JobStatus.FAILED, reason=why)
                for run_id in self._queue:
                    self._end(run_id, failure)
                self._queue.clear()
                self._barren = 0
        return self._members_to_start()

    # --- the members -------------------------------------------------------------

    def restart(self, member: int) -> Restart:
        """A member's worker group (re)started: its new start number and the job to continue."""
        state = self.members.get(member)
        if state is None:
            return Restart(0)
        state.starts += 1
        if state.starts == 1 or state.job is None:
            return Restart(state.starts)
        job = self.jobs[state.job]
        job.failures += 1  # the worker group died under the job
        if job.failures > job.max_failures:
            state.job = None
            self._give_up(job, default_reason="the worker process died")
            return Restart(state.starts)
        return Restart(state.starts, job.request)

    def take(self, member: int, start: int, *, idle_expired: bool = False) -> Handout:
        """The next queued job for ``member``; STOP when it is stale, the pool closed, or
        (``idle_expired`` with nothing queued) it retires; else WAIT."""
        state = self._current(member, start)
        if state is None:
            return STOP
        if self.closed:
            self.members.pop(member, None)
            return STOP
        if self._queue:
            job = self.jobs[self._queue.popleft()]
            state.job = job.run_id
            if job.picked is None:
                job.picked = self._clock()
            self._barren = 0
            return Handout(job.request)
        if idle_expired:
            # Retiring with the queue empty: a job queued later sees one member fewer
            # and has its caller start a new one.
            del self.members[member]
            return STOP
        return WAIT

    def job_error(self, member: int, start: int, reason: str, *, retryable: bool = True) -> AfterError:
        """Records why the member's job raised; RESTART while it has an attempt left."""
        state = self._current(member, start)
        if state is None or state.job is None:
            return AfterError.NEXT_JOB
        job = self.jobs[state.job]
        job.reason = reason
        if retryable and job.failures + 1 <= job.max_failures:
            return AfterError.RESTART
        state.job = None
        suffix = f" (after {job.failures} restarts)" if job.failures else ""
        self._end(job.run_id, JobEnd(JobStatus.FAILED, reason=reason + suffix))
        return AfterError.NEXT_JOB

    def finish(self, member: int, start: int, metrics: dict[str, float]) -> None:
        state = self._current(member, start)
        if state is None or state.job is None:
            return
        job = self.jobs[state.job]
        state.job = None
        state.served += 1
        launch_s = job.picked - job.submitted if job.picked is not None else None
        self._end(job.run_id, JobEnd(JobStatus.FINISHED, dict(metrics), launch_s=launch_s))

    # --- internals ---------------------------------------------------------------

    def _current(self, member: int, start: int) -> Member | None:
        state = self.members.get(member)
        return state if state is not None and state.starts == start else None

    def _members_to_start(self) -> list[int]:
        """New member ids so that every queued job has a member, up to ``slots``."""
        if self.closed:
            return []
        busy = sum(m.job is not None for m in self.members.values())
        wanted = min(self.slots, busy + len(self._queue))
        started = []
        while len(self.members) < wanted:
            self.members[self._next_member] = Member()
            started.append(self._next_member)
            self._next_member += 1
        return started

    def _give_up(self, job: Job, *, default_reason: str = "no reason given") -> None:
        reason = job.reason or default_reason
        self._end(job.run_id, JobEnd(JobStatus.FAILED, reason=f"gave up after {job.failures} failures: {reason}"))

    def _end(self, run_id: str, end: JobEnd) -> None:
        job = self.jobs.get(run_id)
        if job is not None and job.end is None:
            job.end = end
