"""The ``transfusion`` flow: a grid of training jobs, then its analyses."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.analysis import collect_records_task, results_table_task, seed_similarity_task
from tasks.pretraining import resolve_pretrained_task
from tasks.training import (
    JobOutcome,
    finish_grid_run_task,
    open_grid_run_task,
    prepare_dataset_task,
    start_compute_task,
    train_job_task,
)
from transfusion.analysis.tables import ResultRow, to_markdown
from transfusion.config import GridSpec
from transfusion.data import transfusion_home
from transfusion.services import tracking_service

log = logging.getLogger(__name__)


@dataclass
class GridSummary:
    """What a grid run produced and where to look at it."""

    grid: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    finished: int
    skipped: int
    failed: list[str] = field(default_factory=list)
    table_markdown: str = ""
    similarity_markdown: str = ""
    rows: list[ResultRow] = field(default_factory=list)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _describe(outcome: JobOutcome) -> str:
    spec = outcome.spec
    name = f"{spec.model} {spec.init_label} {spec.data_size} seed {spec.seed}"
    if outcome.status == "FAILED":
        return f"{name}: FAILED ({outcome.reason})"
    auc = outcome.metrics.get("test/auc", float("nan"))
    when = "already done" if outcome.status == "SKIPPED" else f"{outcome.seconds:.0f} s"
    return f"{name}: test/auc {auc:.3f} ({when})"


@flow(name="transfusion", task_runner=ThreadPoolTaskRunner(max_workers=64), log_prints=False)
def transfusion(grid: GridSpec) -> GridSummary:
    """Trains every job of ``grid`` (skipping finished ones), then analyses the grid."""
    with tracking_service(transfusion_home()) as tracking_uri:
        grid_run = open_grid_run_task(grid)
        dataset_root = prepare_dataset_task(grid)
        slots = start_compute_task(grid)
        jobs = grid.jobs()
        _progress(f"grid {grid.name}: {len(jobs)} jobs, up to {slots} at a time; tracking at {tracking_uri}")

        sources = {}
        if grid.pretrained:
            for model in grid.models:
                sources[model] = resolve_pretrained_task.submit(model, grid.pretrained, grid.train.resolution)
        futures = [
            train_job_task.submit(spec, grid_run, dataset_root, sources[spec.model] if spec.pretrained else None)
            for spec in jobs
        ]
        outcomes: list[JobOutcome] = []
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                outcome = future.result()
            except Exception as exc:  # e.g. pretrained weights could not be resolved
                spec = jobs[futures.index(future)]
                outcome = JobOutcome(spec.job_key, spec, "FAILED", None, reason=f"{type(exc).__name__}: {exc}")
            outcomes.append(outcome)
            _progress(f"[{done}/{len(jobs)}] {_describe(outcome)}")

        records = collect_records_task(grid)
        rows = results_table_task(grid, grid_run, records)
        similarity = seed_similarity_task(grid, grid_run, records)
        failed = [_describe(o) for o in outcomes if o.status == "FAILED"]
        finish_grid_run_task(grid_run, outcomes)
        return GridSummary(
            grid=grid.name,
            tracking_uri=tracking_uri,
            experiment_id=grid_run.experiment_id,
            parent_run_id=grid_run.run_id,
            finished=sum(o.status == "FINISHED" for o in outcomes),
            skipped=sum(o.status == "SKIPPED" for o in outcomes),
            failed=failed,
            table_markdown=to_markdown(rows),
            similarity_markdown=similarity,
            rows=rows,
        )
