"""Tasks that read a finished grid from MLflow and publish its analyses."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from prefect import task

from transfusion import tracking
from transfusion.analysis.records import JobRecord
from transfusion.analysis.representations import seed_similarity, seed_similarity_markdown
from transfusion.analysis.tables import ResultRow, plot_results, results_table, to_markdown, write_csv
from transfusion.config import GridSpec
from transfusion.data import transfusion_home

log = logging.getLogger(__name__)


def probe_cache_dir(run_id: str) -> Path:
    return transfusion_home() / "cache" / "probes" / run_id


def fetch_probes(run_id: str) -> Path | None:
    """Downloads a run's probe activations once into the local cache."""
    target = probe_cache_dir(run_id)
    if target.is_dir() and any(target.glob("step-*.npz")):
        return target
    names = tracking.list_artifacts(run_id, "probes")
    if not names:
        return None
    with tempfile.TemporaryDirectory(dir=transfusion_home()) as tmp:
        local = tracking.download_artifact(run_id, "probes", Path(tmp))
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            local.rename(target)
    return target


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
