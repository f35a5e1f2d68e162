"""Runs a training job under Ray Train: the only module that imports Ray.

The plain loop of :mod:`transfusion.train` is touched at three points, as in Ray's own
examples: the worker turns its config dict into a :class:`JobSpec`, the model goes
through ``prepare_model`` when there are several workers, and each evaluation is
reported with a checkpoint, from which Ray Train restarts a crashed worker.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from transfusion.config import JobSpec

log = logging.getLogger(__name__)

# Ray Train V2's report() waits for the controller's next poll (2 s by default); a
# short interval makes a few reports per job cheap.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_V2_ENABLED": "1",
}
STATE_FILE = "state.pt"


def ensure_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> dict[str, float]:
    """Connects to ``$RAY_ADDRESS`` or starts a local Ray; returns cluster resources."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        env_vars = {
            k: os.environ[k] for k in (*RAY_ENV_DEFAULTS, "MLFLOW_TRACKING_URI", "TRANSFUSION_HOME") if k in os.environ
        }
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": env_vars},
            "logging_level": logging.WARNING,
            "log_to_driver": bool(os.environ.get("TRANSFUSION_RAY_LOGS")),
            "include_dashboard": False,
        }
        if not os.environ.get("RAY_ADDRESS"):
            kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus)
        else:
            kwargs.pop("include_dashboard")
        ray.init(**kwargs)
    return ray.cluster_resources()


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a worker needs, as plain data (it crosses process boundaries)."""

    spec: dict
    run_id: str
    tracking_uri: str
    dataset_root: str
    source_uri: str | None
    fault_at_step: int | None = None
    kill_at_step: int | None = None
    kill_marker: str | None = None

    def as_config(self) -> dict:
        return dict(self.__dict__)


def scaling_for(spec: JobSpec) -> ScalingConfig:
    """One worker per job by default; several with DDP; fractional GPUs for small models."""
    t = spec.train
    use_gpu = t.gpus_per_job > 0
    resources = {"CPU": t.cpus_per_job}
    if use_gpu:
        resources["GPU"] = t.gpus_per_job
    return ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def _train_worker(config: dict) -> dict[str, float]:
    from transfusion.data.prepared import PreparedDataset
    from transfusion.tracking import MlflowHooks
    from transfusion.train import NonFiniteLossError, run_training

    request = LaunchRequest(**config)
    spec = JobSpec.model_validate(request.spec)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, spec.train.threads or int(spec.train.cpus_per_job)))

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)

    def report_checkpoint(state: dict, *, step: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                torch.save(state, Path(directory) / STATE_FILE)
            ray.train.report(
                {"step": step, **metrics},
                checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None,
            )

    source_state = None
    if request.source_uri and resume is None:
        from transfusion.pretrained import load_state_dict_from_uri

        loaded = load_state_dict_from_uri(request.source_uri)
        source_state = loaded.state_dict
        if rank == 0:
            from transfusion.tracking import log_params

            log_params(request.run_id, {"pretrained_sha256": loaded.sha256}, uri=request.tracking_uri)

    def crash_once(step: int) -> None:
        # Fault injection: SIGKILL this worker once (the marker survives the restart).
        if step == request.kill_at_step and request.kill_marker and not Path(request.kill_marker).exists():
            Path(request.kill_marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)

    hooks = MlflowHooks(request.run_id, uri=request.tracking_uri, checkpoint=report_checkpoint)
    dataset = PreparedDataset.open(request.dataset_root)
    try:
        result = run_training(
            spec,
            dataset,
            hooks=hooks,
            source_state=source_state,
            resume=resume,
            prepare_model=ray.train.torch.prepare_model if world_size > 1 else None,
            rank=rank,
            world_size=world_size,
            fault_at_step=request.fault_at_step,
            on_step=crash_once if request.kill_at_step is not None else None,
        )
    except NonFiniteLossError as exc:
        # Deterministic: a restart would diverge again, so report instead of raising.
        return {"failed": f"NonFiniteLossError: {exc}"}
    return {"steps": float(result.steps), **result.final_metrics}


def storage_location(path: str) -> tuple[str, Any]:
    """(storage_path, filesystem) for RunConfig; ``s3://`` honours ``AWS_ENDPOINT_URL``.

    pyarrow's S3 filesystem takes the credentials from the usual AWS variables; only
    the endpoint of an S3-compatible server has to be given explicitly.
    """
    if not path.startswith("s3://"):
        return path, None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return path, None
    from urllib.parse import urlparse

    import pyarrow.fs

    parsed = urlparse(endpoint)
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=parsed.netloc,
        scheme=parsed.scheme or "https",
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    return path.removeprefix("s3://"), filesystem


def fit_job(request: LaunchRequest, *, storage_path: str) -> dict[str, float]:
    """Runs one job on Ray Train and returns its final metrics (from the chief worker)."""
    spec = JobSpec.model_validate(request.spec)
    path, filesystem = storage_location(storage_path)
    # One worker needs no process group: V2's plain data-parallel trainer skips the
    # torch.distributed set-up and starts the worker about a second sooner.
    trainer_class = TorchTrainer if spec.train.num_workers > 1 else DataParallelTrainer
    trainer = trainer_class(
        _train_worker,
        train_loop_config=request.as_config(),
        scaling_config=scaling_for(spec),
        run_config=RunConfig(
            name=f"{spec.grid}-{spec.job_key}",
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    value = dict(result.return_value or {})
    if "failed" in value:
        raise JobFailedError(value["failed"])
    return value


class JobFailedError(RuntimeError):
    """The job stopped for a reason a restart cannot fix (e.g. a NaN loss)."""
