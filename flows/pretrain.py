"""The ``transfusion-pretrain`` flow: pretrain a model on a source set and register it."""

from __future__ import annotations

from prefect import flow

from flows.runtime import tracking_service
from tasks.pretraining import pretrain_register_task
from tasks.training import preflight_task, start_compute_task, stop_compute_task
from transfusion.config import ModelName
from transfusion.data import transfusion_home


@flow(name="transfusion-pretrain", log_prints=False)
def pretrain(
    model: ModelName,
    source: str = "synthetic",
    steps: int | None = None,
    resolution: int | None = None,
    seed: int = 0,
    epochs: float | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    data: str | None = None,
) -> str:
    """Pretrains ``model`` on ``source`` and registers ``transfusion-<model>-<source>``.

    ``source`` is ``synthetic`` (procedural shapes, the offline default), ``domain:<dataset>``
    (a registered medical set read from ``data``; registered as ``transfusion-<model>-domain-<dataset>``) or the path /
    ``s3://`` URI of an ImageNet-style folder (``train/<class>/*.JPEG``, ``val/...``),
    registered as ``transfusion-<model>-imagenet`` after the full recipe (90 epochs at the
    model's standard resolution unless ``epochs``/``steps`` say otherwise), with its top-1/top-5
    on held-out ``val/`` images recorded on the version. Returns the ``models:/`` URI.
    """
    from tasks.pretraining import pretrain_grid

    grid = pretrain_grid(
        model, source=source, resolution=resolution, steps=steps, epochs=epochs, seed=seed, workers=workers,
        gpus_per_worker=gpus_per_worker, data=data,
    )  # fmt: skip
    with tracking_service(transfusion_home()):
        preflight_task(grid)
        start_compute_task(grid)
        try:
            return pretrain_register_task(grid, model=model, source=source)
        finally:
            stop_compute_task()
