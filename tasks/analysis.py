"""Tasks that read a finished grid from MLflow and publish its analyses."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import yaml
from prefect import task

from tasks.artifacts import linked_results_table
from tasks.training import identified_jobs, prepare_dataset_task
from transfusion import tracking
from transfusion.analysis.basin import CURVES_FILE, DatasetLocation, InterpolationInputs
from transfusion.analysis.convergence import ConvergenceSettings
from transfusion.analysis.records import JobRecord
from transfusion.analysis.report import analyze_records, code_version_notes, write_report
from transfusion.analysis.representations import (
    AnalysisSettings,
    RepresentationCache,
    seed_similarity,
    seed_similarity_markdown,
)
from transfusion.analysis.tables import ResultRow, plot_results, results_table, to_markdown, write_csv
from transfusion.analysis.transfer_effect import transfer_effect_metrics
from transfusion.config import GridSpec, JobSpec
from transfusion.data import transfusion_home
from transfusion.grid_status import missing_jobs_line
from transfusion.launcher import RayAnalysisExecutor
from transfusion.pretrained import WEAK
from transfusion.provenance import CODE_VERSION_TAG

log = logging.getLogger(__name__)


@task(name="require-trained", cache_policy=None)
def require_trained_task(grid: GridSpec) -> None:
    """An analysis needs finished jobs: a grid never trained is an error, not an empty report."""
    experiment_id = tracking.experiment_id_for(grid.name)
    finished = experiment_id is not None and tracking.client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{tracking.ROLE_TAG}` = 'job' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if not finished:
        raise ValueError(
            f"grid {grid.name!r} has no finished jobs in the tracking store {tracking.tracking_uri()}; "
            f"train it first: transfusion run {grid.name}"
        )


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


def fetch_artifact_file(run_id: str, artifact: str, local: Path) -> Path | None:
    """Downloads the file ``artifact`` of a run to ``local`` unless it is there already; None
    when the run stored no such file."""
    if local.is_file():
        return local
    if artifact not in tracking.list_artifacts(run_id, str(Path(artifact).parent)):
        return None
    local.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local.parent) as tmp:
        tracking.download_artifact(run_id, artifact, Path(tmp)).rename(local)
    return local


def fetch_test_predictions(run_id: str) -> Path | None:
    """Downloads a run's test predictions once into the local cache (None for runs that stored none)."""
    return fetch_artifact_file(run_id, "predictions/test.npz", run_cache_dir(run_id) / "predictions" / "test.npz")


FINAL_WEIGHTS = "checkpoint/model.pt"


def fetch_final_weights(run_id: str) -> Path:
    """Downloads a run's final weights (``checkpoint/model.pt``) once into the local cache.

    Raises:
        FileNotFoundError: The run stored none.
    """
    local = fetch_artifact_file(run_id, FINAL_WEIGHTS, run_cache_dir(run_id) / FINAL_WEIGHTS)
    if local is None:
        raise FileNotFoundError(f"run {run_id} stored no {FINAL_WEIGHTS}")
    return local


def grid_dataset_location(grid: GridSpec) -> DatasetLocation:
    """The grid's prepared data (prepared now if it is not yet) and, for a cluster whose nodes share
    no disk with this one, its published copy."""
    from transfusion.data.node_cache import for_workers

    root = prepare_dataset_task.fn(grid)
    return DatasetLocation(root, for_workers(root, None)[0])


def fetch_stored_curves(grid_run: tracking.GridRun, directory: Path) -> None:
    """Brings the interpolation curves the grid's last report stored (``report/`` of its parent run)
    into ``directory`` when it has none, so the analysis reuses them instead of recomputing."""
    fetch_artifact_file(grid_run.run_id, f"report/{CURVES_FILE}", directory / CURVES_FILE)


def analysis_settings(grid: GridSpec) -> AnalysisSettings:
    """The similarity and interpolation settings as the grid sets them (``interpolation_*``)."""
    points, pairs = grid.interpolation_points, grid.interpolation_pairs
    return AnalysisSettings(interpolation_points=points, interpolation_pairs=pairs)


def convergence_settings(grid: GridSpec) -> ConvergenceSettings:
    """Figure 5's threshold as the grid sets it (``convergence_threshold``, ``convergence_mode``)."""
    return ConvergenceSettings(threshold=grid.convergence_threshold, relative=grid.convergence_mode == "relative")


@task(name="collect-records", cache_policy=None)
def collect_records_task(
    grid: GridSpec, *, with_probes: bool = True, jobs: list[JobSpec] | None = None
) -> list[JobRecord]:
    """The finished run that counts for each job of the grid (jobs without one are left out).

    ``jobs``: the grid's identified jobs when the caller has them (else identified here),
    so a run of other data, weights or (where the grid says) code is never reported.
    """
    experiment_id = tracking.experiment_id_for(grid.name)
    records = []
    if experiment_id is None:
        return records
    for match in tracking.match_job_runs(experiment_id, jobs if jobs is not None else identified_jobs(grid)):
        if match.run is None:
            continue
        spec, run = match.job, tracking.client().get_run(match.run.run_id)
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
                predictions=fetch_test_predictions(run.info.run_id),
                source=run.data.tags.get("source.description", ""),
                source_weak=run.data.tags.get("source.quality") == WEAK,
                code_version=run.data.tags.get(CODE_VERSION_TAG, ""),
                block_shuffle=str(spec.block_shuffle),
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
    rows = seed_similarity(records, cache=RepresentationCache(AnalysisSettings(), parallel=RayAnalysisExecutor))
    text = seed_similarity_markdown(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed_similarity.md"
        path.write_text("### Top-layer SVCCA between seeds\n\n" + text)
        tracking.log_artifact(grid_run.run_id, path, "tables")
    return text


def what_was_run(grid: GridSpec, records: list[JobRecord], jobs: list[JobSpec]) -> str:
    """The summary's sentence on what was run: the grid's axes, its runs, its source and code."""
    sizes = ", ".join(str(size) for size in grid.data_sizes)
    inits = ", ".join(dict.fromkeys(job.init_label for job in jobs))
    text = (
        f"grid {grid.name} on {grid.dataset}: {', '.join(grid.models)} × {inits} × sizes {sizes} × "
        f"{len(grid.seeds)} seed(s); {len(records)} finished runs of {len(jobs)} jobs"
    )
    if grid.pretrained:
        weak = any(record.source_weak for record in records)
        text += f"; pretrained source {grid.pretrained} ({'**weak**' if weak else 'not weak by the weak_source rule'})"
    versions = sorted({record.code_version or "unrecorded" for record in records})
    if versions:
        text += f"; code version{'s' if len(versions) > 1 else ''} {', '.join(versions)}"
    return text + "."


@task(name="analyze-grid", cache_policy=None)
def analyze_grid_task(
    grid: GridSpec,
    grid_run: tracking.GridRun,
    records: list[JobRecord],
    out: str | None = None,
    jobs: list[JobSpec] | None = None,
) -> str:
    """Figures 2, 4, 5, Tables 1-3, filters, Same basin? and the report; logged under ``report/`` of the parent run.

    ``jobs``: the grid's identified jobs (else identified here), whose keys the records carry.
    """
    directory = Path(out) if out else transfusion_home() / "reports" / grid.name
    convergence = convergence_settings(grid)
    jobs = jobs if jobs is not None else identified_jobs(grid)
    fetch_stored_curves(grid_run, directory)
    # Final weights and the data are read only for pairs whose curves are not stored yet.
    interpolation = InterpolationInputs({job.job_key: job for job in jobs}, fetch_final_weights,
                                        lambda: grid_dataset_location(grid))  # fmt: skip
    outputs = analyze_records(
        records,
        directory,
        grid_name=grid.name,
        dataset=grid.dataset,
        settings=analysis_settings(grid),
        convergence=convergence,
        parallel_executor=RayAnalysisExecutor,
        ran=what_was_run(grid, records, jobs),
        interpolation=interpolation,
    )
    missing = missing_jobs_line(jobs, {record.job_key for record in records})
    notes = [
        *([missing] if missing else []),  # first: a reader must know before reading any table
        f"{len(records)} finished runs of {len(grid.jobs())} jobs; dataset {grid.dataset}.",
        f"Convergence threshold: {convergence.describe()}.",
        "Test metrics at: " + ("the step of best validation AUC (select: best-val)" if grid.train.select == "best-val"
                               else "the last step (select: last)")
        + "; training subsets: " + ("drawn per seed" if grid.train.subset_seed is None
                                    else f"one fixed subset for all seeds (subset_seed {grid.train.subset_seed})")
        + ".",
    ]  # fmt: skip
    notes += code_version_notes(records)
    if grid.pretrained == "synthetic":
        notes.append(
            "Transfer here is synthetic-source transfer (weights pretrained on procedural shapes), not ImageNet."
        )
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")) and records:  # links a browser can follow
        table = linked_results_table(results_table(records), records, tracking_uri=uri,
                                     experiment_id=grid_run.experiment_id)  # fmt: skip
        outputs.sections.append(("MLflow runs of each cell", table, []))
    config_yaml = yaml.safe_dump(grid.model_dump(mode="json"), sort_keys=False)
    write_report(outputs, title=f"transfusion report: grid {grid.name}", notes=notes, config_yaml=config_yaml)
    if outputs.transfer_rows:
        tracking.log_metrics(grid_run.run_id, transfer_effect_metrics(outputs.transfer_rows), step=0)
    for path in sorted(directory.iterdir()):
        if path.is_file():
            tracking.log_artifact(grid_run.run_id, path, "report")
    log.info("analysis: %d decompositions and %d interpolated pairs for %d runs", outputs.decompositions,
             outputs.interpolations, len(records))  # fmt: skip
    return str(directory)
