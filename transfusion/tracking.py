"""Everything that talks to MLflow: runs, metrics, artifacts, datasets, models, the registry.

This is the only library module that imports MLflow. Jobs log over HTTP to a
tracking server; a grid is a parent run and each job a child run tagged with its
``job_key``, which is how a re-run finds work already done. Each job run also carries
what the MLflow UI shows as first-class entities: its dataset splits as run inputs, its
final weights as a logged model (with the test metrics it scored) and the node's
system metrics while it trained.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
from mlflow.tracking import MlflowClient

from transfusion.config import IDENTITY_FIELDS, GridSpec, JobSpec
from transfusion.grid_status import RunView
from transfusion.identity import JobMatch, RecordedRun, match_finished_runs
from transfusion.job_lease import Claim, claims_in
from transfusion.provenance import CODE_VERSION_TAG, ENVIRONMENT_ARTIFACT, environment_report, provenance_tags

log = logging.getLogger(__name__)
T = TypeVar("T")

ROLE_TAG = "transfusion.role"
PARENT_TAG = "mlflow.parentRunId"
REASON_TAG = "failure_reason"
OPENED_TAG = "transfusion.opened_at"  # ms since the epoch, zero-padded so that it sorts as text
# The MLflow UI opens an experiment of this kind on its training-runs view (runs table,
# models, datasets) instead of the GenAI view (traces) it picks for an untagged one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"
MODEL_NAME = "model"
# Tags the MLflow compare view lines a grid's cells up by (on job runs and the parent's table).
CELL_TAGS = ("model", "init", "data_size", "seed")
# What a job read, by content: ``data_version``, ``weights_sha256`` (``code_version`` is
# provenance: the whole version of the code that ran, whatever part the key covers).
IDENTITY_TAGS = tuple(name for name in IDENTITY_FIELDS if name != CODE_VERSION_TAG)
SUPERSEDED_TAG = "superseded_by"  # on a finished run a forced retrain replaced: the new run's id


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RuntimeError("MLFLOW_TRACKING_URI is not set: no tracking server to log to")
    return uri


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or tracking_uri())


def with_retries(action: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.5) -> T:
    """Runs ``action``, retrying with exponential backoff while the server is unreachable."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:  # MLflow wraps connection errors in several types.
            if attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt
            log.warning("%s failed (%s); retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def ensure_experiment(name: str, *, description: str | None = None, uri: str | None = None) -> str:
    """The experiment's id, created if needed, tagged as a model-training experiment."""
    c = client(uri)
    experiment = c.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = c.create_experiment(name)
        except mlflow.exceptions.MlflowException:
            # Another process created it between our lookup and create.
            experiment_id = c.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    # Set on every open: experiments made before these tags existed get them too.
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    if description:
        tags[DESCRIPTION_TAG] = description
    for key, value in tags.items():
        if experiment is None or experiment.tags.get(key) != value:
            with_retries(lambda k=key, v=value: c.set_experiment_tag(experiment_id, k, v), what="tag experiment")
    return experiment_id


def describe_grid(grid: GridSpec) -> str:
    """One paragraph saying what the grid trains, for the experiment's description."""
    inits = ", ".join(dict.fromkeys(job.init_label for job in grid.jobs()))
    sizes = ", ".join(str(s) for s in grid.data_sizes)
    source = f" ({grid.dataset_source})" if grid.dataset_source else ""
    blocks = "" if grid.block_shuffle == ["none"] else f" x block shuffles {', '.join(map(str, grid.block_shuffle))}"
    return (
        f"Grid {grid.name!r}: {len(grid.jobs())} training jobs on {grid.dataset}{source} — "
        f"models {', '.join(grid.models)} x inits {inits} x data sizes {sizes}{blocks} x seeds "
        f"{', '.join(map(str, grid.seeds))}, {grid.train.steps} steps each. The parent run "
        f"grid-{grid.name} holds the results table; each job run its dataset, model and metrics."
    )


def job_params(spec: JobSpec) -> dict[str, str]:
    params = {
        "model": spec.model,
        "init": spec.init,
        "init_options": json.dumps(spec.init_options, sort_keys=True),
        "pretrained": str(spec.pretrained),
        "dataset": spec.dataset,
        "dataset_source": str(spec.dataset_source),
        "data_size": str(spec.data_size),
        "seed": str(spec.seed),
    }
    if spec.block_shuffle_or_none is not None:  # absent on runs from before the axis, like their keys
        params["block_shuffle"] = str(spec.block_shuffle)
    params.update({f"train.{k}": str(v) for k, v in spec.train.model_dump().items()})
    return params


def job_tags(spec: JobSpec) -> dict[str, str]:
    """The run's cell, key and identity (what it read, by content) and this process's provenance."""
    source = {"source": spec.source_label} if spec.source_label else {}
    identity = {name: value for name in IDENTITY_TAGS if (value := getattr(spec, name)) is not None}
    return {
        **source,
        **identity,
        **provenance_tags(),  # the worker that trains sets its own again
        ROLE_TAG: "job",
        "job_key": spec.job_key,
        "grid": spec.grid,
        "model": spec.model,
        "init": spec.init_label,
        "data_size": str(spec.data_size),
        "block_shuffle": str(spec.block_shuffle),
        "seed": str(spec.seed),
        "dataset": spec.dataset,
        "mlflow.runName": spec.run_name,
    }


def recorded_run(run) -> RecordedRun:
    """What an MLflow run records of a job, as :mod:`transfusion.identity` reads it.

    Runs before content identity hold the data version as the param ``data_version`` and
    the weights' sha256 as the param ``pretrained_sha256`` (logged by the worker that
    loaded them); newer runs also carry both as tags.
    """
    tags, params = run.data.tags, run.data.params
    return RecordedRun(
        run_id=run.info.run_id,
        job_key=tags.get("job_key", ""),
        status=run.info.status,
        start_time=int(run.info.start_time or 0),
        data_version=tags.get("data_version") or params.get("data_version"),
        weights_sha256=params.get("pretrained_sha256") or tags.get("weights_sha256"),
        code_version=tags.get(CODE_VERSION_TAG),
        superseded_by=tags.get(SUPERSEDED_TAG),
    )


def recorded_runs(experiment_id: str, job_keys: Sequence[str] | None = None, *, uri: str | None = None) -> list:
    """The job runs of an experiment as :class:`~transfusion.identity.RecordedRun` (those under ``job_keys`` if given).

    A few keys are looked up one by one; a whole grid's in one paged search of its job runs.
    """
    if job_keys is not None and len(job_keys) <= 8:
        keys = dict.fromkeys(job_keys)
        return [recorded_run(run) for key in keys for run in find_job_runs(experiment_id, key, uri=uri)]
    c = client(uri)
    found, token = [], None
    while True:
        page = with_retries(
            lambda t=token: c.search_runs(
                [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'job'", max_results=1000, page_token=t
            ),
            what="search job runs",
        )
        found.extend(recorded_run(run) for run in page)
        token = page.token
        if not token:
            break
    wanted = None if job_keys is None else set(job_keys)
    return [run for run in found if wanted is None or run.job_key in wanted]


def match_job_runs(experiment_id: str, jobs: Sequence[JobSpec], *, uri: str | None = None) -> list[JobMatch]:
    """:func:`transfusion.identity.match_finished_runs` of ``jobs`` against this experiment's runs."""
    keys = [key for job in jobs for key in job.lookup_keys]
    return match_finished_runs(jobs, recorded_runs(experiment_id, keys, uri=uri))


def supersede(run_ids: Sequence[str], by: str, *, uri: str | None = None) -> None:
    """Tags finished runs that a forced retrain replaced: kept, but no longer counted for their job."""
    for run_id in run_ids:
        set_tags(run_id, {SUPERSEDED_TAG: by}, uri=uri)


def find_job_runs(experiment_id: str, job_key: str, *, uri: str | None = None) -> list:
    c = client(uri)
    return c.search_runs(
        [experiment_id],
        filter_string=f"tags.job_key = '{job_key}'",
        max_results=100,
        order_by=["attributes.start_time DESC"],
    )


class JobClaims:
    """The lease claims (:mod:`transfusion.job_lease`) on one job's runs: tags ``lease.<id>``
    (a :class:`transfusion.job_lease.ClaimStore`)."""

    def __init__(self, experiment_id: str, job_key: str, *, uri: str | None = None) -> None:
        self.experiment_id, self.job_key, self.uri = experiment_id, job_key, uri

    def write(self, claim: Claim) -> None:
        set_tags(claim.run_id, {claim.tag: claim.value()}, uri=self.uri)

    def drop(self, claim: Claim) -> None:
        client(self.uri).delete_tag(claim.run_id, claim.tag)  # once: an ended run's claim holds nothing anyway

    def claims(self) -> list[Claim]:
        """Claims on the job's RUNNING runs: a run that ended (finished, failed, killed by an
        interrupt) holds nothing, whatever its tags say."""
        runs = find_job_runs(self.experiment_id, self.job_key, uri=self.uri)
        return [claim for run in runs if run.info.status == "RUNNING"
                for claim in claims_in(run.info.run_id, run.data.tags)]  # fmt: skip


def delete_run(run_id: str, *, uri: str | None = None) -> None:
    """Moves a run to MLflow's trash: searches no longer see it (a lost lease's empty run)."""
    c = client(uri)
    with_retries(lambda: c.delete_run(run_id), what="delete run")


def find_finished_run(experiment_id: str, job_keys: str | Sequence[str], *, uri: str | None = None):
    """The newest FINISHED run under the first of ``job_keys`` that has one (``JobSpec.lookup_keys``:
    the current key, then the keys older versions gave the same job)."""
    for job_key in [job_keys] if isinstance(job_keys, str) else job_keys:
        for run in find_job_runs(experiment_id, job_key, uri=uri):
            if run.info.status == "FINISHED":
                return run
    return None


def create_job_run(spec: JobSpec, *, experiment_id: str, parent_run_id: str | None, uri: str | None = None) -> str:
    """A new RUNNING child run with the spec as params, tags and a JSON artifact."""
    c = client(uri)
    tags = job_tags(spec)
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = with_retries(lambda: c.create_run(experiment_id, tags=tags), what="create run")
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in job_params(spec).items()]
    with_retries(lambda: c.log_batch(run_id, params=params), what="log params")
    log_json(run_id, spec.model_dump(mode="json"), "spec.json", uri=uri)
    return run_id


def log_text(run_id: str, text: str, name: str, *, uri: str | None = None) -> None:
    """A text file ``name`` at the root of the run's artifacts (written again each attempt)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        with_retries(lambda: client(uri).log_artifact(run_id, str(path)), what=f"log {name}")


def log_provenance(run_id: str, *, uri: str | None = None) -> None:
    """This process's ``code_version``/``image`` tags and ``environment.txt`` on a run."""
    set_tags(run_id, provenance_tags(), uri=uri)
    log_text(run_id, environment_report(), ENVIRONMENT_ARTIFACT, uri=uri)


def log_json(run_id: str, payload: Any, name: str, *, artifact_path: str | None = None, uri: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(payload, indent=2, sort_keys=True))
        with_retries(lambda: client(uri).log_artifact(run_id, str(path), artifact_path), what=f"log {name}")


def set_tags(run_id: str, tags: dict[str, str], *, uri: str | None = None) -> None:
    c = client(uri)
    with_retries(lambda: c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]), what="set tags")


def log_params(run_id: str, params: dict[str, str], *, uri: str | None = None) -> None:
    c = client(uri)
    with_retries(lambda: c.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()]), what="log params")


def log_metrics(run_id: str, metrics: dict[str, float], *, step: int, uri: str | None = None) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    c = client(uri)
    with_retries(lambda: c.log_batch(run_id, metrics=batch), what="log metrics")


def log_artifact(run_id: str, local_path: Path, artifact_path: str | None = None, *, uri: str | None = None) -> None:
    c = client(uri)
    with_retries(lambda: c.log_artifact(run_id, str(local_path), artifact_path), what=f"log {local_path.name}")


def end_run(run_id: str, status: str = "FINISHED", *, reason: str | None = None, uri: str | None = None) -> None:
    c = client(uri)
    if reason:
        set_tags(run_id, {REASON_TAG: reason[:4000]}, uri=uri)
    with_retries(lambda: c.set_terminated(run_id, status), what="end run")


def reopen_run(run_id: str, *, uri: str | None = None) -> None:
    c = client(uri)
    with_retries(lambda: c.update_run(run_id, status="RUNNING"), what="reopen run")


def download_artifact(run_id: str, path: str, dst: Path, *, uri: str | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    local = with_retries(
        lambda: mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri or tracking_uri()
        ),
        what=f"download {path}",
    )
    return Path(local)


def list_artifacts(run_id: str, path: str | None = None, *, uri: str | None = None) -> list[str]:
    return [f.path for f in client(uri).list_artifacts(run_id, path)]


def metric_history(run_id: str, key: str, *, uri: str | None = None) -> list[tuple[int, float]]:
    history = client(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def split_dataset_name(dataset: str, split: str) -> str:
    return f"{dataset}/{split}"


def dataset_digest(meta: dict[str, Any]) -> str:
    """A prepared dataset's version, which changes whenever its images or labels do."""
    return str(meta.get("version") or "unversioned")[:36]  # MLflow's digest column holds 36 characters


def test_dataset_of(spec: JobSpec, meta: dict[str, Any]) -> tuple[str, str]:
    """(name, digest) of the dataset input a job's test metrics come from."""
    return split_dataset_name(spec.dataset, "test"), dataset_digest(meta)


def log_dataset_inputs(
    run_id: str, spec: JobSpec, meta: dict[str, Any], *, source_uri: str, uri: str | None = None
) -> None:
    """The job's train, val and test splits as MLflow run inputs (the runs table's Dataset column).

    Digest is the prepared dataset's version; the profile says how many images and
    labels the job used from the split (its training subset for ``train``).
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        # A local path matches MLflow's local-artifact source twice over; it warns, then picks it.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(source_uri)
    counts = dict(meta.get("counts") or {})
    if spec.data_size != "full":
        counts["train"] = min(int(spec.data_size), int(counts.get("train", spec.data_size)))
    labels = list(meta.get("label_names") or [])
    inputs = []
    for split in ("train", "val", "test"):
        profile = {"images": int(counts.get(split, 0)), "labels": len(labels), "label_names": labels}
        dataset = Dataset(
            name=split_dataset_name(spec.dataset, split),
            digest=dataset_digest(meta),
            source_type=source._get_source_type(),
            source=source.to_json(),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
    c = client(uri)
    with_retries(lambda: c.log_inputs(run_id, datasets=inputs), what="log dataset inputs")


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.pytorch.log_model``/``load_model``) pointed at ``uri`` for a block.

    ``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``, which this module
    reads: both are put back after, so a server used for one block never becomes the
    process's tracking server.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets the variable as well


def log_final_model(
    run_id: str,
    model,
    *,
    input_example,
    metrics: dict[str, float],
    step: int,
    test_dataset: tuple[str, str] | None = None,
    uri: str | None = None,
) -> str:
    """Logs ``model`` as this run's MLflow model and links ``metrics`` to it; returns its ``models:/`` URI.

    ``mlflow.pytorch.load_model`` of the URI gives the module back; ``test_dataset`` is
    the (name, digest) of the dataset input the test metrics were computed on.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    c = client(uri)
    run = c.get_run(run_id)
    # A CPU float32 copy: loadable anywhere, and the training device may be a GPU.
    model = copy.deepcopy(model).to("cpu", torch.float32)
    logged = with_retries(
        lambda: c.create_logged_model(
            run.info.experiment_id,
            name=MODEL_NAME,
            source_run_id=run_id,
            params=dict(run.data.params),
            tags={k: run.data.tags[k] for k in (*CELL_TAGS, "job_key", "grid") if k in run.data.tags},
            model_type="image-classifier",
        ),
        what="create logged model",
    )
    model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).float().numpy()
    # Given outright, requirements and signature need no trial load of the model in a
    # subprocess, which would cost seconds per job.
    with fluent_tracking_uri(uri or tracking_uri()):
        mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            model_id=logged.model_id,
            signature=infer_signature(input_example, output),
            input_example=input_example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "transfusion"],
            # The module itself (its class comes from transfusion.models): it can be put in
            # eval mode, fine-tuned or probed; a torch.export program could not.
            serialization_format="pickle",
        )
    with_retries(
        lambda: c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)]), what="link model to run"
    )
    now = int(time.time() * 1000)
    name, digest = test_dataset or (None, None)
    batch = [
        Metric(k, float(v), now, step, model_id=logged.model_id, dataset_name=name, dataset_digest=digest)
        if k.startswith("test/")
        else Metric(k, float(v), now, step)
        for k, v in metrics.items()
    ]
    with_retries(lambda: c.log_batch(run_id, metrics=batch), what="log final metrics")
    with_retries(lambda: c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY), what="finalize model")
    return f"models:/{logged.model_id}"


class MlflowHooks:
    """:class:`transfusion.train.TrainingHooks` that log to one MLflow run.

    Used as a context manager it also samples the node's system metrics (CPU, memory,
    GPU where present) into the run while the job trains.
    """

    def __init__(
        self, run_id: str, *, uri: str | None = None, checkpoint=None, test_dataset: tuple[str, str] | None = None
    ) -> None:
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self._checkpoint = checkpoint
        self._test_dataset = test_dataset
        self._monitor = None

    def __enter__(self) -> MlflowHooks:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:  # a job trains without system metrics rather than not at all
            log.warning("no system metrics for run %s: %s", self.run_id, exc)
            self._monitor = None
        return self

    def __exit__(self, *exc) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def log_model(self, model, *, input_example, metrics: dict[str, float], step: int) -> None:
        log_final_model(
            self.run_id,
            model,
            input_example=input_example,
            metrics=metrics,
            step=step,
            test_dataset=self._test_dataset,
            uri=self.uri,
        )

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        log_metrics(self.run_id, metrics, step=step, uri=self.uri)

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        log_artifact(self.run_id, local_path, artifact_path, uri=self.uri)

    def checkpoint(self, state: dict[str, Any], *, step: int, metrics: dict[str, float]) -> None:
        if self._checkpoint is not None:
            self._checkpoint(state, step=step, metrics=metrics)


@dataclass(frozen=True)
class GridRun:
    experiment_id: str
    run_id: str


def open_grid_run(grid: GridSpec, *, uri: str | None = None) -> GridRun:
    """The grid's parent run: reused if this exact grid ran before, else created."""
    c = client(uri)
    experiment_id = ensure_experiment(grid.name, description=describe_grid(grid), uri=uri)
    existing = c.search_runs(
        [experiment_id],
        filter_string=f"tags.grid_key = '{grid.grid_key}' and tags.`{ROLE_TAG}` = 'grid'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    opened = {OPENED_TAG: f"{int(time.time() * 1000):015d}"}
    if existing:
        run_id = existing[0].info.run_id
        reopen_run(run_id, uri=uri)
        set_tags(run_id, opened, uri=uri)
        log_provenance(run_id, uri=uri)  # the code that ran the grid last
        return GridRun(experiment_id, run_id)
    run = c.create_run(
        experiment_id,
        tags={
            ROLE_TAG: "grid",
            "grid": grid.name,
            "grid_key": grid.grid_key,
            "mlflow.runName": f"grid-{grid.name}",
            **opened,
        },
    )
    log_json(run.info.run_id, grid.model_dump(mode="json"), "grid.json", uri=uri)
    log_provenance(run.info.run_id, uri=uri)
    return GridRun(experiment_id, run.info.run_id)


def experiment_page_url(server_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment, in its model-training view (the runs table).

    MLflow >= 3.10 picks GenAI or model-training views from a global switch (the
    ``workflowType`` query parameter, else the browser's last choice), no longer from the
    experiment's kind tag alone; the parameter makes the link open on the runs either way.
    """
    return f"{server_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def last_grid_experiment(*, uri: str | None = None) -> str | None:
    """The experiment id of the grid run opened last on this tracking server (None: no grid yet)."""
    runs = client(uri).search_runs(
        [e.experiment_id for e in client(uri).search_experiments()],
        filter_string=f"tags.`{ROLE_TAG}` = 'grid'",
        order_by=[f"tags.`{OPENED_TAG}` DESC"],
        max_results=1,
    )
    return runs[0].info.experiment_id if runs else None


RESULTS_TABLE = "tables/results.json"


def log_results_table(run_id: str, rows: list[dict[str, Any]], *, uri: str | None = None) -> None:
    """The grid's results as an MLflow table on its parent run (the UI's table artifact view)."""
    columns = {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}
    c = client(uri)
    with_retries(lambda: c.log_table(run_id, data=columns, artifact_file=RESULTS_TABLE), what="log results table")


@dataclass(frozen=True)
class RunningJob:
    job_key: str
    run_id: str
    step: int
    val_auc: float | None


def running_jobs(experiment_id: str, parent_run_id: str, *, uri: str | None = None) -> list[RunningJob]:
    """The grid's RUNNING job runs with their latest training step and validation AUC."""
    c = client(uri)
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    found = []
    for run in runs:
        # The loss is logged several times between evaluations: its last step is where the job is.
        history = c.get_metric_history(run.info.run_id, "train/loss")
        step = max((m.step for m in history), default=0)
        auc = run.data.metrics.get("val/auc")
        found.append(RunningJob(run.data.tags.get("job_key", ""), run.info.run_id, step, auc))
    return found


def experiment_id_for(name: str, *, uri: str | None = None) -> str | None:
    experiment = client(uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def register_model_weights(name: str, run_id: str, artifact_path: str, *, uri: str | None = None) -> str:
    """Registers ``runs:/run_id/artifact_path`` as a new version of ``name``; returns ``models:/name/version``."""
    c = client(uri)
    try:
        c.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # already registered
    source = f"runs:/{run_id}/{artifact_path}"
    version = c.create_model_version(name, source, run_id=run_id)
    return f"models:/{name}/{version.version}"


def latest_model_version(name: str, *, uri: str | None = None) -> str | None:
    c = client(uri)
    try:
        versions = c.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    if not versions:
        return None
    best = max(versions, key=lambda v: int(v.version))
    return f"models:/{name}/{best.version}"


def _model_version_of(uri_text: str) -> tuple[str, str]:
    """(name, version) of ``models:/name/version``; ``latest`` resolved to a number."""
    parts = uri_text.removeprefix("models:/").split("/")
    if len(parts) != 2:
        raise ValueError(f"expected models:/<name>/<version>, got {uri_text!r}")
    name, version = parts
    if version == "latest":
        latest = latest_model_version(name)
        if latest is None:
            raise ValueError(f"no registered model named {name!r}")
        version = latest.rsplit("/", 1)[1]
    return name, version


def set_model_version_tags(uri_text: str, tags: dict[str, str], *, uri: str | None = None) -> None:
    """Tags on a registered ``models:/name/version`` (e.g. the source's measured accuracy)."""
    name, version = _model_version_of(uri_text)
    c = client(uri)
    for key, value in tags.items():
        with_retries(lambda k=key, v=value: c.set_model_version_tag(name, version, k, str(v)), what="tag model")


def model_version_tags(uri_text: str, *, uri: str | None = None) -> dict[str, str]:
    name, version = _model_version_of(uri_text)
    return dict(client(uri).get_model_version(name, version).tags)


def download_registered_weights(uri_text: str, *, dst: Path | None = None) -> Path:
    """Local file of a ``models:/name/version`` (or ``/latest``) registered state dict."""
    from transfusion.pretrained import weights_cache_dir

    parts = uri_text.removeprefix("models:/").split("/")
    if len(parts) != 2:
        raise ValueError(f"expected models:/<name>/<version>, got {uri_text!r}")
    name, version = parts
    c = client()
    if version == "latest":
        latest = latest_model_version(name)
        if latest is None:
            raise ValueError(f"no registered model named {name!r}")
        version = latest.rsplit("/", 1)[1]
    try:
        model_version = c.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"registered model {name!r} has no version {version}") from None
    if dst is None:
        # One cached copy per registered artifact (its source names the run that logged
        # it), not a new temporary folder per job that nobody removes.
        key = hashlib.sha256(f"{tracking_uri()}|{model_version.source}".encode()).hexdigest()[:16]
        dst = weights_cache_dir() / "models" / key
    if not (dst.is_dir() and any(dst.rglob("*.pt"))):
        dst.parent.mkdir(parents=True, exist_ok=True)
        # Into a folder of its own, then renamed: concurrent jobs never read a partial file.
        partial = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".partial-"))
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=model_version.source, dst_path=str(partial), tracking_uri=tracking_uri()
            )
            with contextlib.suppress(OSError):  # another job got there first
                os.replace(partial, dst)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    candidates = sorted(dst.rglob("*.pt"))
    if not candidates:
        raise ValueError(f"{uri_text} holds no .pt state dict")
    return candidates[0]


def _register_models_scheme() -> None:
    # Weight URIs like models:/transfusion-cbr-tiny-synthetic/3 resolve through MLflow.
    from transfusion.pretrained import SCHEME_LOADERS

    SCHEME_LOADERS.setdefault("models", lambda uri: download_registered_weights(uri))


_register_models_scheme()


DEVICE_SECONDS = "time/device_s"  # wall time x devices held (GPUs, or CPUs for a CPU job)


def grid_job_runs(experiment_name: str, *, uri: str | None = None) -> dict[str, list[RunView]]:
    """Every job run of the grid's experiment by ``job_key``, newest first (empty: no experiment)."""
    from mlflow.entities import ViewType

    experiment_id = experiment_id_for(experiment_name, uri=uri)
    if experiment_id is None:
        return {}
    c = client(uri)
    found: dict[str, list[RunView]] = {}
    page_token = None
    while True:
        page = c.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'job'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=page_token,
        )
        for run in page:
            key = run.data.tags.get("job_key", "")
            found.setdefault(key, []).append(
                RunView(
                    run_id=run.info.run_id,
                    job_key=key,
                    status=run.info.status,
                    reason=run.data.tags.get(REASON_TAG, ""),
                    device_s=run.data.metrics.get(DEVICE_SECONDS),
                    start_time_ms=run.info.start_time or 0,
                    end_time_ms=run.info.end_time,
                )
            )
        page_token = page.token
        if not page_token:
            return found


def grid_of_run(run_id: str, *, uri: str | None = None) -> dict[str, Any]:
    """The grid a parent run was opened for (its ``grid.json``), as plain data."""
    c = client(uri)
    try:
        run = c.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--run-id {run_id}: no such run in the tracking store {uri or tracking_uri()}") from None
    if run.data.tags.get(ROLE_TAG) != "grid":
        raise ValueError(f"--run-id {run_id} is a job run, not a grid's parent run (grid-<name> in the MLflow UI)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(c.download_artifacts(run_id, "grid.json", tmp))
        return json.loads(path.read_text())


def runs_frame(experiment_name: str, *, uri: str | None = None):
    """One row per job run of the experiment: run id, status, times, every param, metric and tag (a DataFrame)."""
    import pandas as pd

    experiment_id = experiment_id_for(experiment_name, uri=uri)
    if experiment_id is None:
        return pd.DataFrame()
    with fluent_tracking_uri(uri or tracking_uri()):
        frame = mlflow.search_runs(
            experiment_ids=[experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'job'",
            order_by=["attributes.start_time ASC"],
        )
    return frame
