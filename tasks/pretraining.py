"""Pretrained weights for transfer inits: resolve a source, or pretrain and register one."""

from __future__ import annotations

import logging
import math

from prefect import task

from tasks.sources import (  # noqa: F401  (re-exported: where callers found them before)
    SYNTHETIC_SOURCE,
    TORCHVISION_IMAGENET,
    existing_source_uri,
    registered_name,
    source_label,
    source_quality,
    source_tags,
)
from transfusion import tracking
from transfusion.config import DOMAIN_PREFIX, GridSpec, TrainSettings, WeakSourceSettings, domain_dataset
from transfusion.data import PreparedDataset
from transfusion.data.synthetic import PROCEDURAL_DATASETS
from transfusion.models import canonical_model_name
from transfusion.pretrained import WEAK, SourceQuality, source_for

log = logging.getLogger(__name__)

# The real recipe for an ImageNet-style folder (the torchvision classic recipe, with
# cosine decay and label smoothing): what "pretrained on ImageNet" means in the paper.
IMAGENET_RECIPE = {"epochs": 90, "warmup_epochs": 5, "batch_size": 256, "lr_per_256": 0.1, "weight_decay": 1e-4,
                   "label_smoothing": 0.1, "val_limit": 10_000}  # fmt: skip
# The input side each model's ImageNet weights are trained at (torchvision's references).
STANDARD_RESOLUTION = {"inception-v3": 299}
DEFAULT_RESOLUTION = 224
SYNTHETIC_STEPS, SYNTHETIC_RESOLUTION = 120, 40


def standard_resolution(model: str) -> int:
    return STANDARD_RESOLUTION.get(canonical_model_name(model), DEFAULT_RESOLUTION)


def imagenet_recipe(
    model: str,
    *,
    train_images: int,
    epochs: float = IMAGENET_RECIPE["epochs"],
    resolution: int | None = None,
    steps: int | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
) -> TrainSettings:
    """Training settings for ``epochs`` over ``train_images``: SGD, linear warm-up then cosine, label smoothing.

    ``steps`` overrides the epoch count (a short trial); the source is then recorded with
    the epochs it really saw, and labelled weak if that is too few.
    """
    r = IMAGENET_RECIPE
    batch = r["batch_size"]
    steps_per_epoch = max(1, math.ceil(train_images / batch))
    total = steps or max(1, math.ceil(epochs * train_images / batch))
    return TrainSettings(
        steps=total,
        batch_size=batch,
        optimizer="sgd",
        lr=r["lr_per_256"] * batch / 256,
        weight_decay=r["weight_decay"],
        warmup_steps=min(total - 1, r["warmup_epochs"] * steps_per_epoch),
        eval_every=min(total, steps_per_epoch),
        resolution=resolution or standard_resolution(model),
        eval_batch_size=256,
        val_limit=r["val_limit"],
        probe_size=0,
        label_smoothing=r["label_smoothing"],
        num_workers=workers,
        gpus_per_job=gpus_per_worker,
    )


def pretrain_grid(
    model: str,
    *,
    source: str = SYNTHETIC_SOURCE,
    resolution: int | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    seed: int = 0,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    data: str | None = None,
) -> GridSpec:
    """The one-job grid that pretrains ``model`` on ``source``.

    ``domain:<dataset>`` pretrains on a registered (medical) dataset -- a domain source,
    read from ``data`` unless the set is procedural -- for ``steps`` (default the short
    synthetic run, which its version records as weak).

    ``synthetic`` is the procedural shapes set (the offline default: a short toy run,
    which its registered version records as weak); anything else is the path or
    ``s3://`` URI of an ImageNet-style folder, trained by :func:`imagenet_recipe` at the
    model's standard resolution (the folder is prepared here to count its images).
    """
    if source == SYNTHETIC_SOURCE or source.startswith(DOMAIN_PREFIX):
        steps = steps or SYNTHETIC_STEPS
        train = TrainSettings(
            steps=steps,
            batch_size=32,
            lr=2e-3,
            eval_every=max(1, steps // 3),
            resolution=resolution or SYNTHETIC_RESOLUTION,
            probe_size=0,
            val_limit=400,
        )
        dataset, dataset_source = "synthetic-shapes", None
        if source.startswith(DOMAIN_PREFIX):
            dataset, dataset_source = domain_dataset(source), data
    else:
        from transfusion.data import prepare_dataset

        dataset, dataset_source = "imagenet-folder", source
        resolution = resolution or standard_resolution(model)
        train_images = len(prepare_dataset(dataset, source=source, resolution=resolution).indices("train"))
        train = imagenet_recipe(
            model, train_images=train_images, epochs=epochs or IMAGENET_RECIPE["epochs"], resolution=resolution,
            steps=steps, workers=workers, gpus_per_worker=gpus_per_worker,
        )  # fmt: skip
    return GridSpec(
        name=f"pretrain-{source_label(source)}",
        dataset=dataset,
        dataset_source=dataset_source,
        models=[model],
        inits=["random"],
        seeds=[seed],
        train=train,
    )


def pretrain_and_register(grid: GridSpec, *, register_as: str) -> str:
    """Runs the pretraining grid's job and registers its weights; returns ``models:/...``."""
    from tasks.training import end_failed_run, open_grid_run_task, prepare_dataset_task, run_job

    (spec,) = grid.jobs()
    dataset_root = prepare_dataset_task.fn(grid)
    grid_run = open_grid_run_task.fn(grid)
    try:
        outcome = run_job(spec, grid_run, dataset_root)
        if not outcome.ok:
            raise RuntimeError(f"pretraining {spec.model} on {grid.dataset} failed: {outcome.reason}")
        uri = tracking.register_model_weights(register_as, outcome.run_id, "checkpoint")
        label = {"synthetic-shapes": "synthetic-source transfer", "imagenet-folder": "ImageNet-folder transfer"}.get(
            grid.dataset, f"domain transfer ({grid.dataset})"
        )
        train_images = len(PreparedDataset.open(dataset_root).indices("train"))
        quality = measured_quality(grid, outcome.metrics, train_images=train_images)
        tags = source_tags(uri, quality, grid.weak_source)
        tracking.set_model_version_tags(uri, tags)
        tracking.set_tags(outcome.run_id, {"registered_as": uri, "transfer_label": label, **tags})
        if tags["source.quality"] == WEAK:
            log.warning("%s is a weak source (%s): transfer from it will be labelled weak", uri, quality.describe())
    except BaseException as exc:  # the parent run says why, instead of staying RUNNING
        end_failed_run(grid_run.run_id, exc)
        raise
    tracking.end_run(grid_run.run_id, "FINISHED")
    log.info("registered %s", uri)
    return uri


def measured_quality(grid: GridSpec, metrics: dict[str, float], *, train_images: int) -> SourceQuality:
    """A pretraining job's quality: top-1/top-5 on its held-out images, epochs and images drawn."""
    images_seen = int(metrics.get("steps", grid.train.steps)) * grid.train.batch_size
    return SourceQuality(
        dataset=grid.dataset,
        top1=float(metrics.get("test/accuracy", float("nan"))),
        top5=float(metrics.get("test/top5", float("nan"))),
        epochs=images_seen / max(1, train_images),
        images_seen=images_seen,
    )


@task(name="resolve-pretrained", cache_policy=None, task_run_name="pretrained-{model}")
def resolve_pretrained_task(
    model: str, pretrained: str, resolution: int, weak_source: WeakSourceSettings | None = None
) -> str:
    """A loadable URI for ``model``'s pretrained weights named by a grid's ``pretrained``.

    A grid asking for ``imagenet`` whose registered source is weak gets one warning line.
    """
    if pretrained == SYNTHETIC_SOURCE or pretrained.startswith(DOMAIN_PREFIX):
        name = registered_name(model, source_label(pretrained))
        existing = tracking.latest_model_version(name)
        if existing is not None:
            return existing
        dataset = SYNTHETIC_SOURCE if pretrained == SYNTHETIC_SOURCE else domain_dataset(pretrained)
        if dataset != SYNTHETIC_SOURCE and dataset not in PROCEDURAL_DATASETS:
            raise ValueError(
                f"no {pretrained} weights for {model!r}: pretrain them once with 'transfusion pretrain --model "
                f"{model} --pretrained {pretrained} --source PATH_OR_S3_URI --steps N' (registers {name})"
            )
        return pretrain_and_register(pretrain_grid(model, source=pretrained, resolution=resolution), register_as=name)
    if pretrained == "imagenet":
        if model in TORCHVISION_IMAGENET:
            return f"torchvision:{TORCHVISION_IMAGENET[model]}/IMAGENET1K_V1"
        # No published ImageNet weights (the CBR nets): our own, pretrained once.
        registered = tracking.latest_model_version(registered_name(model, "imagenet"))
        if registered is None:
            raise ValueError(
                f"no ImageNet weights for {model!r}: pretrain them once with "
                f"'transfusion pretrain --model {model} --pretrained PATH_OR_S3_URI_OF_IMAGENET' "
                f"(registers {registered_name(model, 'imagenet')}), or use pretrained: synthetic"
            )
        tags = source_tags(registered, source_quality(registered), weak_source or WeakSourceSettings())
        if tags["source.quality"] == WEAK:
            log.warning("pretrained: imagenet for %s is only a weak source, %s", model, tags["source.description"])
        return registered
    registered = source_for(pretrained)
    if registered is None:
        return pretrained
    if not registered.fits(model):
        raise ValueError(f"pretrained source {pretrained} holds {registered.model} weights; it does not fit {model}")
    return registered.uri  # its quality and provenance are found by this URI


@task(name="pretrain-and-register", cache_policy=None, task_run_name="pretrain-{model}-{source}")
def pretrain_register_task(grid: GridSpec, *, model: str, source: str) -> str:
    return pretrain_and_register(grid, register_as=registered_name(model, source_label(source)))
