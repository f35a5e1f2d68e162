"""A grid's results in the Prefect UI: the results table and a Markdown report linking each cell to its MLflow runs."""

from __future__ import annotations

import dataclasses
import logging
import math
import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from transfusion import tracking
from transfusion.analysis.records import JobRecord
from transfusion.analysis.tables import ResultRow
from transfusion.config import GridSpec

log = logging.getLogger(__name__)


def artifact_key(grid: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{grid}-{what}".lower()).strip("-")


def _cell(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def linked_results_table(
    rows: list[ResultRow], records: list[JobRecord], *, tracking_uri: str, experiment_id: str
) -> str:
    """The results table, each (model, init, data size) cell linked to its seeds' MLflow runs (Markdown)."""
    runs: dict[tuple[str, str, str], list[JobRecord]] = {}
    for record in records:
        runs.setdefault((record.model, record.init, record.data_size), []).append(record)
    lines = [
        "| model | init | data size | seeds | test AUC | test AUPRC | MLflow runs |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        cell = sorted(runs.get((row.model, row.init, row.data_size), []), key=lambda r: r.seed)
        links = " ".join(f"[seed {r.seed}]({run_url(tracking_uri, experiment_id, r.run_id)})" for r in cell)
        lines.append(
            f"| {row.model} | {row.init} | {row.data_size} | {row.seeds} | {row.auc_text()} | {row.auprc_text()} "
            f"| {links or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def report_markdown(
    grid: str, rows: list[ResultRow], records: list[JobRecord], *, tracking_uri: str, grid_run: tracking.GridRun
) -> str:
    """The Prefect report: the parent run's link, then :func:`linked_results_table`."""
    parent = run_url(tracking_uri, grid_run.experiment_id, grid_run.run_id)
    lines = [
        f"# Grid {grid}: test AUC over seeds",
        "",
        f"Mean ± std over seeds, in percent. Parent MLflow run: [grid-{grid}]({parent}) "
        "(tables/ and report/ artifacts hold the figures and the full report).",
        "",
    ]
    return "\n".join(lines) + linked_results_table(
        rows, records, tracking_uri=tracking_uri, experiment_id=grid_run.experiment_id
    )


@task(name="publish-prefect-artifacts", cache_policy=None)
def publish_results_artifacts_task(
    grid: str, rows: list[ResultRow], records: list[JobRecord], tracking_uri: str, grid_run: tracking.GridRun
) -> None:
    """The results table as a Prefect table artifact and the linked report as a Markdown artifact."""
    table = [{k: _cell(v) for k, v in dataclasses.asdict(row).items()} for row in rows]
    create_table_artifact(
        table, key=artifact_key(grid, "results"), description=f"grid {grid}: test AUC/AUPRC mean and std over seeds"
    )
    create_markdown_artifact(
        report_markdown(grid, rows, records, tracking_uri=tracking_uri, grid_run=grid_run),
        key=artifact_key(grid, "report"),
        description=f"grid {grid}: results with links to the MLflow runs",
    )


@task(name="publish-plan", cache_policy=None)
def publish_plan_artifact_task(grid: GridSpec) -> None:
    """The grid's plan (jobs, FLOPs, device-hours, price per model) as a table artifact, before training starts."""
    from transfusion.grid_status import grid_status
    from transfusion.plan import format_plan, local_device, plan_grid, plan_rows

    try:
        status = grid_status(grid.name, grid.jobs(), tracking.grid_job_runs(grid.name))
        plan = plan_grid(grid, device=local_device(), status=status)
    except Exception as exc:  # the plan informs; a model it cannot cost must not stop the grid
        log.warning("no plan artifact for grid %s: %s", grid.name, exc)
        return
    total = format_plan(plan).splitlines()
    summary = " ".join(line for line in total if line.startswith(("Estimate:", "Price:")))
    create_table_artifact(
        plan_rows(plan), key=artifact_key(grid.name, "plan"), description=f"grid {grid.name}: {summary}"
    )
