"""Pretrained weights for transfer inits: resolve a source, or pretrain and register one."""

from __future__ import annotations

import logging

from prefect import task

from transfusion import tracking
from transfusion.config import GridSpec, TrainSettings

log = logging.getLogger(__name__)

# Models that have torchvision IMAGENET1K_V1 weights (pinned: DEFAULT may change).
TORCHVISION_IMAGENET = {"resnet50": "resnet50", "inception_v3": "inception_v3", "slim-resnet50": "resnet50"}
SYNTHETIC_SOURCE = "synthetic"


def registered_name(model: str, source: str) -> str:
    return f"transfusion-{model}-{source}"


def source_label(source: str) -> str:
    """``synthetic`` stays; a folder of ImageNet-style images registers as ``imagenet``."""
    return SYNTHETIC_SOURCE if source == SYNTHETIC_SOURCE else "imagenet"


def pretrain_grid(
    model: str, *, source: str = SYNTHETIC_SOURCE, resolution: int = 40, steps: int = 120, seed: int = 0
) -> GridSpec:
    """The one-job grid that pretrains ``model`` on ``source``.

    ``synthetic`` is the procedural shapes set (the offline default); anything else is
    the path or ``s3://`` URI of an ImageNet-style folder.
    """
    if source == SYNTHETIC_SOURCE:
        dataset, dataset_source = "synthetic-shapes", None
    else:
        dataset, dataset_source = "imagenet-folder", source
    return GridSpec(
        name=f"pretrain-{source_label(source)}",
        dataset=dataset,
        dataset_source=dataset_source,
        models=[model],
        inits=["random"],
        seeds=[seed],
        train=TrainSettings(
            steps=steps,
            batch_size=32,
            lr=2e-3,
            eval_every=max(1, steps // 3),
            resolution=resolution,
            probe_size=0,
            val_limit=400,
        ),
    )


def pretrain_and_register(grid: GridSpec, *, register_as: str) -> str:
    """Runs the pretraining grid's job and registers its weights; returns ``models:/...``."""
    from tasks.training import end_failed_run, open_grid_run_task, prepare_dataset_task, train_job_task

    (spec,) = grid.jobs()
    dataset_root = prepare_dataset_task.fn(grid)
    grid_run = open_grid_run_task.fn(grid)
    try:
        outcome = train_job_task.fn(spec, grid_run, dataset_root)
        if not outcome.ok:
            raise RuntimeError(f"pretraining {spec.model} on {grid.dataset} failed: {outcome.reason}")
        uri = tracking.register_model_weights(register_as, outcome.run_id, "checkpoint")
        label = "synthetic-source transfer" if grid.dataset == "synthetic-shapes" else "ImageNet-folder transfer"
        tracking.set_tags(outcome.run_id, {"registered_as": uri, "transfer_label": label})
    except BaseException as exc:  # the parent run says why, instead of staying RUNNING
        end_failed_run(grid_run.run_id, exc)
        raise
    tracking.end_run(grid_run.run_id, "FINISHED")
    log.info("registered %s", uri)
    return uri


@task(name="resolve-pretrained", cache_policy=None, task_run_name="pretrained-{model}")
def resolve_pretrained_task(model: str, pretrained: str, resolution: int) -> str:
    """A loadable URI for ``model``'s pretrained weights named by a grid's ``pretrained``."""
    if pretrained == SYNTHETIC_SOURCE:
        name = registered_name(model, SYNTHETIC_SOURCE)
        existing = tracking.latest_model_version(name)
        if existing is not None:
            return existing
        return pretrain_and_register(pretrain_grid(model, resolution=resolution), register_as=name)
    if pretrained == "imagenet":
        if model in TORCHVISION_IMAGENET:
            return f"torchvision:{TORCHVISION_IMAGENET[model]}/IMAGENET1K_V1"
        # No published ImageNet weights (the CBR nets): our own, pretrained once.
        registered = tracking.latest_model_version(registered_name(model, "imagenet"))
        if registered is None:
            raise ValueError(
                f"no ImageNet weights for {model!r}: pretrain them once with "
                f"'transfusion pretrain --model {model} --source PATH_OR_S3_URI_OF_IMAGENET' "
                f"(registers {registered_name(model, 'imagenet')}), or use pretrained: synthetic"
            )
        return registered
    return pretrained


@task(name="pretrain-and-register", cache_policy=None, task_run_name="pretrain-{model}-{source}")
def pretrain_register_task(grid: GridSpec, *, model: str, source: str) -> str:
    return pretrain_and_register(grid, register_as=registered_name(model, source_label(source)))
