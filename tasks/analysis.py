"""Tasks that read a finished grid from MLflow and publish its analyses."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from prefect import task

from transfusion import tracking
from transfusion.analysis.records import JobRecord
from transfusion.analysis.report import analyze_records, write_report
from transfusion.analysis.representations import seed_similarity, seed_similarity_markdown
from transfusion.analysis.tables import ResultRow, plot_results, results_table, to_markdown, write_csv
from transfusion.config import GridSpec
from transfusion.data import transfusion_home

log = logging.getLogger(__name__)


def run_cache_dir(run_id: str) -> Path:
    return transfusion_home() / "cache" / "runs" / run_id


def fetch_probes(run_id: str) -> Path | None:
    """Downloads a run's probe activations and conv1 filters once into the local cache."""
    target = run_cache_dir(run_id)
    for folder in ("probes", "filters"):
        local = target / folder
        if local.is_dir() and any(local.iterdir()):
            continue
        if not tracking.list_artifacts(run_id, folder):
            continue
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            downloaded = tracking.download_artifact(run_id, folder, Path(tmp))
            if not local.exists():
                downloaded.rename(local)
    probes = target / "probes"
    return probes if probes.is_dir() else None


@task(name="collect-records", cache_policy=None)
def collect_records_task(grid: GridSpec, *, with_probes: bool = True) -> list[JobRecord]:
    """The newest FINISHED run of each job of the grid (missing jobs are left out)."""
    experiment_id = tracking.experiment_id_for(grid.name)
    records = []
    if experiment_id is None:
        return records
    for spec in grid.jobs():
        run = tracking.find_finished_run(experiment_id, spec.job_key)
        if run is None:
            continue
        records.append(
            JobRecord(
                job_key=spec.job_key,
                run_id=run.info.run_id,
                model=spec.model,
                init=spec.init_label,
                data_size=str(spec.data_size),
                seed=spec.seed,
                status="FINISHED",
                metrics=dict(run.data.metrics),
                val_curve=tuple(tracking.metric_history(run.info.run_id, "val/auc")),
                probe_dir=fetch_probes(run.info.run_id) if with_probes else None,
            )
        )
    return records


@task(name="results-table", cache_policy=None)
def results_table_task(grid: GridSpec, grid_run: tracking.GridRun, records: list[JobRecord]) -> list[ResultRow]:
    rows = results_table(records)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_csv(rows, out / "results.csv")
        (out / "results.md").write_text(to_markdown(rows, title=f"Grid {grid.name}: test AUC over seeds"))
        plot_results(rows, out / "results.png", title=f"{grid.name}: test AUC (mean ± std over seeds)")
        for name in ("results.csv", "results.md", "results.png"):
            tracking.log_artifact(grid_run.run_id, out / name, "tables")
    tracking.log_results_table(grid_run.run_id, [dataclasses.asdict(row) for row in rows])
    return rows


@task(name="seed-similarity", cache_policy=None)
def seed_similarity_task(grid: GridSpec, grid_run: tracking.GridRun, records: list[JobRecord]) -> str:
    rows = seed_similarity(records)
    text = seed_similarity_markdown(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed_similarity.md"
        path.write_text("### Top-layer SVCCA between seeds\n\n" + text)
        tracking.log_artifact(grid_run.run_id, path, "tables")
    return text


@task(name="analyze-grid", cache_policy=None)
def analyze_grid_task(
    grid: GridSpec, grid_run: tracking.GridRun, records: list[JobRecord], out: str | None = None
) -> str:
    """Figures 2, 4, 5, Tables 1-3, filters and the report; logged under ``report/`` of the parent run."""
    directory = Path(out) if out else transfusion_home() / "reports" / grid.name
    outputs = analyze_records(records, directory, grid_name=grid.name, dataset=grid.dataset)
    notes = [f"{len(records)} finished runs of {len(grid.jobs())} jobs; dataset {grid.dataset}."]
    if grid.pretrained == "synthetic":
        notes.append(
            "Transfer here is synthetic-source transfer (weights pretrained on procedural shapes), not ImageNet."
        )
    write_report(outputs, title=f"transfusion report: grid {grid.name}", notes=notes)
    for path in sorted(directory.iterdir()):
        if path.is_file():
            tracking.log_artifact(grid_run.run_id, path, "report")
    log.info("analysis: %d decompositions for %d runs", outputs.decompositions, len(records))
    return str(directory)
