"""Everything that talks to MLflow: runs, metrics, artifacts, the model registry.

This is the only library module that imports MLflow. Jobs log over HTTP to a
tracking server; a grid is a parent run and each job a child run tagged with its
``job_key``, which is how a re-run finds work already done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from transfusion.config import GridSpec, JobSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

ROLE_TAG = "transfusion.role"
PARENT_TAG = "mlflow.parentRunId"
REASON_TAG = "failure_reason"


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


def ensure_experiment(name: str, *, uri: str | None = None) -> str:
    c = client(uri)
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return c.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        return c.get_experiment_by_name(name).experiment_id


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
    params.update({f"train.{k}": str(v) for k, v in spec.train.model_dump().items()})
    return params


def job_tags(spec: JobSpec) -> dict[str, str]:
    return {
        ROLE_TAG: "job",
        "job_key": spec.job_key,
        "grid": spec.grid,
        "model": spec.model,
        "init": spec.init_label,
        "data_size": str(spec.data_size),
        "seed": str(spec.seed),
        "dataset": spec.dataset,
        "mlflow.runName": spec.run_name,
    }


def find_job_runs(experiment_id: str, job_key: str, *, uri: str | None = None) -> list:
    c = client(uri)
    return c.search_runs(
        [experiment_id],
        filter_string=f"tags.job_key = '{job_key}'",
        max_results=100,
        order_by=["attributes.start_time DESC"],
    )


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


class MlflowHooks:
    """:class:`transfusion.train.TrainingHooks` that log to one MLflow run."""

    def __init__(self, run_id: str, *, uri: str | None = None, checkpoint=None) -> None:
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self._checkpoint = checkpoint

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
    experiment_id = ensure_experiment(grid.name, uri=uri)
    existing = c.search_runs(
        [experiment_id],
        filter_string=f"tags.grid_key = '{grid.grid_key}' and tags.`{ROLE_TAG}` = 'grid'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if existing:
        run_id = existing[0].info.run_id
        reopen_run(run_id, uri=uri)
        return GridRun(experiment_id, run_id)
    run = c.create_run(
        experiment_id,
        tags={ROLE_TAG: "grid", "grid": grid.name, "grid_key": grid.grid_key, "mlflow.runName": f"grid-{grid.name}"},
    )
    log_json(run.info.run_id, grid.model_dump(mode="json"), "grid.json", uri=uri)
    return GridRun(experiment_id, run.info.run_id)


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
