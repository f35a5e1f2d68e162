"""The ``transfusion`` flow: a grid of training jobs, then its analyses.

``stage`` picks part of the work: ``all`` (default), ``pretrain`` (only resolve or
pretrain the grid's transfer sources), ``train`` (jobs, no analysis) or ``analysis``
(only the analyses of an already trained grid).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.arguments import warn_gpus_left_idle
from flows.runtime import tracking_service
from tasks.analysis import (
    analyze_grid_task,
    collect_records_task,
    require_trained_task,
    results_table_task,
    seed_similarity_task,
)
from tasks.artifacts import publish_plan_artifact_task, publish_results_artifacts_task
from tasks.pretraining import resolve_pretrained_task
from tasks.progress import GridProgressArtifact, job_label, watch_grid
from tasks.training import (
    JobOutcome,
    clear_interrupt,
    end_failed_run,
    finish_grid_run_task,
    identified_jobs,
    identify_jobs_task,
    interrupt_of,
    interrupt_open_runs,
    interrupting,
    job_task_options,
    open_grid_run_task,
    pending_jobs_task,
    preflight_task,
    prepare_dataset_task,
    start_compute_task,
    stop_compute_task,
    train_job_task,
    unchanged_since_task,
)
from transfusion.analysis.tables import ResultRow, to_markdown
from transfusion.config import GridSpec, JobSpec, PresetName, load_grid
from transfusion.data import transfusion_home
from transfusion.errors import first_line
from transfusion.grid_status import missing_jobs_line
from transfusion.identity import RetrainFilter

if TYPE_CHECKING:
    from transfusion.tracking import GridRun

log = logging.getLogger(__name__)

Stage = Literal["all", "pretrain", "train", "analysis"]


@dataclass
class GridSummary:
    """What a grid run produced and where to look at it."""

    grid: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    finished: int = 0
    skipped: int = 0
    elsewhere: list[str] = field(default_factory=list)  # jobs another live grid trained meanwhile
    failed: list[str] = field(default_factory=list)
    table_markdown: str = ""
    similarity_markdown: str = ""
    rows: list[ResultRow] = field(default_factory=list)
    pretrained: dict[str, str] = field(default_factory=dict)
    report_dir: str | None = None
    transfer_markdown: str = ""  # "Does transfer help?" as the report shows it
    summary_markdown: str = ""  # the report's opening summary
    missing_line: str = ""  # which jobs the analysis lacks, when it lacks any
    result_line: str = ""  # a run that did nothing says so in one line


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _describe(outcome: JobOutcome) -> str:
    name = job_label(outcome.spec)
    if outcome.status == "FAILED":
        return f"{name}: FAILED ({outcome.reason})"
    auc = outcome.metrics.get("test/auc", float("nan"))
    when = {"SKIPPED": "already done", "ELSEWHERE": outcome.reason}.get(outcome.status, f"{outcome.seconds:.0f} s")
    return f"{name}: test/auc {auc:.3f} ({when})"


def _train_jobs(
    grid: GridSpec, grid_run: GridRun, stage: Stage, summary: GridSummary, retrain: str | None = None
) -> tuple[list[JobOutcome], list[JobSpec]]:
    """The training stages: resolve pretrained sources, identify every job by what it reads, then
    train those without a finished run that counts (and those ``retrain`` names); returns the
    outcomes and the identified jobs."""
    clear_interrupt()
    # Bad --retrain text fails before anything trains.
    forced = RetrainFilter.parse(retrain) if retrain is not None else None
    # One resolution per (model, source) the grid's jobs use: their weights' sha256 is part of the jobs' identity.
    sources = {}
    for model, pretrained in dict.fromkeys((s.model, s.pretrained) for s in grid.jobs() if s.pretrained):
        sources[model, pretrained] = resolve_pretrained_task.submit(
            model, pretrained, grid.train.resolution, grid.weak_source
        )
    if stage == "pretrain":
        several = len(grid.sources) > 1
        summary.pretrained = {
            f"{model} {pretrained}" if several else model: future.result()
            for (model, pretrained), future in sources.items()
        }
        for model, uri in summary.pretrained.items():
            _progress(f"{model}: {uri}")
        return [], []
    # Identity comes from the data's version and the weights' hashes, not from decoding images:
    # a re-run with nothing to train reads no image (and prepares nothing).
    jobs = identify_jobs_task(grid, [(*pair, _result_or_none(future)) for pair, future in sources.items()])
    retrained = frozenset(spec.job_key for spec in jobs if forced is not None and forced.matches(spec))
    pending = pending_jobs_task(grid, grid_run, jobs, retrained)
    dataset_root = prepare_dataset_task(grid) if pending else ""
    # Ray starts only when there is something to train: a re-run of a done grid is quick.
    slots = start_compute_task(grid, pending) if pending else 0
    try:
        _progress(
            f"grid {grid.name}: {len(jobs)} jobs, {pending} to train, up to {max(slots, 1)} at a time; "
            f"tracking at {summary.tracking_uri}"
        )
        if pending:
            publish_plan_artifact_task(grid)
        futures = [
            train_job_task.with_options(**job_task_options(spec)).submit(
                spec,
                grid_run,
                dataset_root,
                sources.get((spec.model, spec.pretrained)) if spec.pretrained else None,
                grid.max_retries,
                grid.weak_source,
                spec.job_key in retrained,
            )
            for spec in jobs
        ]
        outcomes = []
        progress_artifact = GridProgressArtifact(grid.name, len(jobs))
        with watch_grid(grid.name, jobs, grid_run) as progress:
            for done, future in enumerate(as_completed(futures), start=1):
                # A failed job's task run is Failed with its outcome as data; a crashed one holds the error.
                outcome = future.result(raise_on_failure=False)
                if not isinstance(outcome, JobOutcome):  # e.g. pretrained weights could not be resolved
                    spec = jobs[futures.index(future)]
                    outcome = JobOutcome(spec.job_key, spec, "FAILED", None, reason=first_line(outcome))
                outcomes.append(outcome)
                progress.finish(outcome.job_key, ok=outcome.ok, line=f"[{done}/{len(jobs)}] {_describe(outcome)}")
                progress_artifact.update(progress)
        return outcomes, jobs
    except BaseException as exc:
        interrupt = interrupt_of(exc)  # SIGINT/SIGTERM: the CLI raises Interrupted, Prefect TerminationSignal
        if interrupt is not None:
            stop_jobs_for_interrupt(interrupt)
        raise
    finally:
        if slots and interrupting() is None:
            stop_compute_task()  # the warm workers go before the analyses


def _result_or_none(future) -> str | None:
    """A resolved source URI, or None when it failed (its jobs fail with the reason when they run)."""
    try:
        return future.result()
    except Exception as exc:
        log.warning("pretrained source not resolved: %s", first_line(exc))
        return None


def stop_jobs_for_interrupt(exc: BaseException) -> None:
    """No queued job starts (the pools' brokers go), running jobs' runs end KILLED while the
    tracking server still answers; their workers go with this process's Ray, and a re-run
    continues each job from its last checkpoint."""
    from transfusion.launcher import close_pools

    interrupt_open_runs(exc)
    try:
        close_pools(wait=False)
    except Exception:
        log.debug("could not close the job pools", exc_info=True)


# Prefect tags the runs its scheduler creates with this.
AUTO_SCHEDULED_TAG = "auto-scheduled"


def _scheduled_run() -> bool:
    from prefect.runtime import flow_run

    return AUTO_SCHEDULED_TAG in (flow_run.tags or [])


@flow(name="transfusion", task_runner=ThreadPoolTaskRunner(max_workers=64), log_prints=False)
def transfusion(
    grid: GridSpec | PresetName,
    stage: Stage = "all",
    report_dir: str | None = None,
    retrain: str | None = None,
    only_if_pending: bool | None = None,
) -> GridSummary:
    """Trains every job of ``grid`` (skipping finished ones), then analyses the grid.

    ``retrain``: a filter (``model=cbr-tiny,init=random``; empty: every job) of jobs to
    train again even though a finished run counts for them; the runs they replace are
    kept and tagged ``superseded_by``. ``only_if_pending``: with no job pending, end at
    once with a one-line result instead of re-analysing an unchanged grid; None (the
    default) does so for runs a schedule started.
    """
    grid = load_grid(grid)
    warn_gpus_left_idle(grid)
    with tracking_service(transfusion_home()) as tracking_uri:
        if stage == "all" and (_scheduled_run() if only_if_pending is None else only_if_pending):
            unchanged = unchanged_since_task(grid)
            if unchanged is not None:
                _progress(unchanged)
                return GridSummary(grid.name, tracking_uri, "", "", result_line=unchanged)
        preflight_task(grid)
        if stage == "analysis":
            require_trained_task(grid)
        grid_run = open_grid_run_task(grid)
        summary = GridSummary(grid.name, tracking_uri, grid_run.experiment_id, grid_run.run_id)
        try:
            outcomes, jobs = [], None
            if stage in ("all", "train", "pretrain"):
                outcomes, jobs = _train_jobs(grid, grid_run, stage, summary, retrain)
            if stage in ("all", "analysis"):
                jobs = jobs if jobs is not None else identified_jobs(grid)  # the keys finished runs carry
                records = collect_records_task(grid, jobs=jobs)
                summary.rows = results_table_task(grid, grid_run, records)
                summary.table_markdown = to_markdown(summary.rows)
                publish_results_artifacts_task(grid.name, summary.rows, records, tracking_uri, grid_run)
                summary.similarity_markdown = seed_similarity_task(grid, grid_run, records)
                summary.report_dir = analyze_grid_task(grid, grid_run, records, report_dir, jobs=jobs)
                summary.missing_line = missing_jobs_line(jobs, {r.job_key for r in records}) or ""
                transfer = Path(summary.report_dir) / "transfer_effect.md"
                which = Path(summary.report_dir) / "which_source.md"  # grids over several sources
                summary.transfer_markdown = "\n".join(f.read_text() for f in (transfer, which) if f.is_file())
                opening = Path(summary.report_dir) / "summary.md"
                summary.summary_markdown = opening.read_text() if opening.is_file() else ""
        except BaseException as exc:
            # The parent run must not stay RUNNING: it says why the flow stopped.
            end_failed_run(grid_run.run_id, exc)
            raise
        summary.finished = sum(o.status == "FINISHED" for o in outcomes)
        summary.skipped = sum(o.status == "SKIPPED" for o in outcomes)
        summary.elsewhere = [_describe(o) for o in outcomes if o.status == "ELSEWHERE"]
        summary.failed = [_describe(o) for o in outcomes if o.status == "FAILED"]
        finish_grid_run_task(grid_run, outcomes)
        return summary
