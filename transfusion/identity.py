"""Which finished runs count for a job, and why the others do not.

A job is identified by what it computes and, by content, what it reads: the prepared
data's version, the resolved pretrained weights' sha256 and, where a grid opts in
(``identity.code``), the code version -- all folded into ``JobSpec.job_key``. A finished
run under the job's current key counts as it is. A finished run under a key an earlier
version gave the job (``JobSpec.legacy_job_keys``: by names, or version 1's) counts only
when what it recorded matches: its ``data_version``, its ``pretrained_sha256`` /
``weights_sha256`` and its ``code_version``. A run replaced by ``--retrain``
(tagged ``superseded_by``) never counts.

The rules are plain data: :class:`RecordedRun` is what a tracking store says of a run
(:func:`transfusion.tracking.recorded_runs` reads them), :func:`match_finished_runs`
decides, and :class:`JobMatch` says which run counts or, per run, why not.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from transfusion.config import INIT_ALIASES, JobSpec
from transfusion.provenance import code_matches


@dataclass(frozen=True)
class RecordedRun:
    """What the tracking store holds of one job run (None: not recorded)."""

    run_id: str
    job_key: str
    status: str  # FINISHED, RUNNING, FAILED, KILLED, SCHEDULED
    start_time: int  # ms since the epoch: newer runs win
    data_version: str | None = None
    weights_sha256: str | None = None
    code_version: str | None = None
    superseded_by: str | None = None


class Mismatch(enum.Enum):
    """Why a recorded run of a job does not count for it."""

    UNFINISHED = "not finished"
    SUPERSEDED = "superseded"
    DATA = "different data"
    WEIGHTS = "different weights"
    CODE = "different code"


@dataclass(frozen=True)
class Rejection:
    """A run that does not count for a job: why, and the recorded value against the wanted one."""

    run_id: str
    why: Mismatch
    recorded: str | None = None
    wanted: str | None = None

    def describe(self) -> str:
        if self.why in (Mismatch.UNFINISHED, Mismatch.SUPERSEDED):
            return f"run {self.run_id}: {self.why.value}{f' by {self.recorded}' if self.recorded else ''}"
        return f"run {self.run_id}: {self.why.value} ({self.recorded or 'not recorded'}, now {self.wanted})"


@dataclass(frozen=True)
class JobMatch:
    """The finished runs that count for one job (newest first) and the runs that do not, with why."""

    job: JobSpec
    counted: tuple[RecordedRun, ...] = ()
    rejected: tuple[Rejection, ...] = ()

    @property
    def run(self) -> RecordedRun | None:
        """The run that stands for the job: the newest that counts (None: the job is to train)."""
        return self.counted[0] if self.counted else None

    def reasons(self) -> list[str]:
        """One line per finished run that does not count (unfinished runs left out: they are resumed)."""
        return [r.describe() for r in self.rejected if r.why is not Mismatch.UNFINISHED]


def _rejection(job: JobSpec, run: RecordedRun) -> Rejection | None:
    """Why ``run`` does not count for ``job``, or None when it does."""
    if run.status != "FINISHED":
        return Rejection(run.run_id, Mismatch.UNFINISHED, run.status)
    if run.superseded_by:
        return Rejection(run.run_id, Mismatch.SUPERSEDED, run.superseded_by)
    if run.job_key == job.job_key:
        return None  # the key already covers the content
    if job.data_version is not None and run.data_version != job.data_version:
        return Rejection(run.run_id, Mismatch.DATA, run.data_version, job.data_version)
    if job.weights_sha256 is not None and run.weights_sha256 != job.weights_sha256:
        return Rejection(run.run_id, Mismatch.WEIGHTS, run.weights_sha256, job.weights_sha256)
    if not code_matches(run.code_version, job.code_version):
        return Rejection(run.run_id, Mismatch.CODE, run.code_version, job.code_version)
    return None


def match_finished_runs(jobs: Sequence[JobSpec], runs: Iterable[RecordedRun]) -> list[JobMatch]:
    """For each job (in order), the finished runs that count for it and why each other run of its keys does not.

    Args:
        jobs: the grid's jobs, identified (``data_version``, ``weights_sha256``,
            ``code_version`` set) or not (then runs are matched by key alone, as before).
        runs: recorded runs of the experiment; runs under none of a job's
            ``lookup_keys`` are ignored for it.
    """
    by_key: dict[str, list[RecordedRun]] = {}
    for run in runs:
        by_key.setdefault(run.job_key, []).append(run)
    matches = []
    for job in jobs:
        counted, rejected = [], []
        # The current key's runs first, then older keys' in the order lookup_keys gives them.
        for key in job.lookup_keys:
            for run in sorted(by_key.get(key, ()), key=lambda r: r.start_time, reverse=True):
                why = _rejection(job, run)
                if why is None:
                    counted.append(run)
                else:
                    rejected.append(why)
        matches.append(JobMatch(job, tuple(counted), tuple(rejected)))
    return matches


# What --retrain FILTER may name, and the JobSpec value each compares with.
RETRAIN_FIELDS = ("model", "init", "data_size", "seed", "source")


@dataclass(frozen=True)
class RetrainFilter:
    """Which jobs ``transfusion run GRID --retrain FILTER`` retrains: every field it names must match.

    A field named twice matches either value (``seed=0,seed=1``). ``init`` matches the
    init's name (``transfer`` standing for ``imagenet``) or its label (``transfer@dino``).
    """

    values: Mapping[str, frozenset[str]]

    @classmethod
    def parse(cls, text: str | None) -> RetrainFilter:
        """``model=cbr-tiny,init=random``; empty: every job."""
        values: dict[str, set[str]] = {}
        for part in (text or "").split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise ValueError(f"--retrain expects FIELD=VALUE pairs separated by commas, got {part.strip()!r}")
            if key not in RETRAIN_FIELDS:
                raise ValueError(f"--retrain: unknown field {key!r}; valid: {', '.join(RETRAIN_FIELDS)}")
            values.setdefault(key, set()).add(INIT_ALIASES.get(value, value) if key == "init" else value)
        return cls({k: frozenset(v) for k, v in values.items()})

    def matches(self, job: JobSpec) -> bool:
        shown = {
            "model": {job.model},
            "init": {job.init, job.init_label},
            "data_size": {str(job.data_size)},
            "seed": {str(job.seed)},
            "source": {job.source_label or "", job.pretrained or ""},
        }
        return all(shown[field] & wanted for field, wanted in self.values.items())
