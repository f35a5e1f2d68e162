"""Preparers for the procedural datasets (no source needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from transfusion.data import DATASETS, PrepareRequest
from transfusion.data.prepared import PreparedDataset, PreparedDatasetWriter
from transfusion.data.synthetic_retina import GENERATOR_VERSION, GRADE_NAMES, generate_split

log = logging.getLogger(__name__)

SYNTHETIC_RETINA_DEFAULTS = {"train": 3000, "val": 400, "test": 800, "seed": 0}


@DATASETS.register("synthetic-retina")
def prepare_synthetic_retina(request: PrepareRequest, data_root: Path) -> PreparedDataset:
    """Procedural fundus images; target: referable DR (grade >= 2)."""
    if request.source not in (None, "", "synthetic"):
        raise ValueError(f"dataset 'synthetic-retina' takes no source, got {request.source!r}")
    sizes = {k: int(request.option(k, v)) for k, v in SYNTHETIC_RETINA_DEFAULTS.items()}
    for split in ("train", "val", "test"):
        if sizes[split] < 1:
            raise ValueError(f"synthetic-retina {split} size must be >= 1, got {sizes[split]}")
    key = (
        f"v{GENERATOR_VERSION}-r{request.resolution}-seed{sizes['seed']}"
        f"-{sizes['train']}-{sizes['val']}-{sizes['test']}"
    )
    root = data_root / key
    if (root / "meta.json").is_file():
        return PreparedDataset.open(root)
    total = sizes["train"] + sizes["val"] + sizes["test"]
    log.info("generating synthetic-retina %s (%d images)", key, total)
    shape = (request.resolution, request.resolution, 3)
    grades, split = [], []
    with PreparedDatasetWriter(root, num_images=total, image_shape=shape) as writer:
        offset = 0
        for split_id, split_name in enumerate(("train", "val", "test")):
            images, split_grades = generate_split(
                request.resolution, sizes[split_name], seed=sizes["seed"], split_id=split_id
            )
            writer.images[offset : offset + len(images)] = images
            offset += len(images)
            grades.append(split_grades)
            split.append(np.full(len(images), split_id))
        grades_all = np.concatenate(grades)
        return writer.finish(
            meta={
                "name": request.name,
                "version": key,
                "resolution": request.resolution,
                "label_names": ["referable_dr"],
                "task": "binary",
                "grade_names": list(GRADE_NAMES),
                "source": "procedural",
            },
            targets=(grades_all >= 2).astype(np.float32)[:, None],
            split=np.concatenate(split),
            grades=grades_all,
        )


SYNTHETIC_SHAPES_DEFAULTS = {"train": 4000, "val": 400, "test": 400, "seed": 0}


@DATASETS.register("synthetic-shapes")
def prepare_synthetic_shapes(request: PrepareRequest, data_root: Path) -> PreparedDataset:
    """Procedural shapes/textures/colours, 16 classes: the offline pretraining source."""
    from transfusion.data import synthetic_shapes

    if request.source not in (None, "", "synthetic"):
        raise ValueError(f"dataset 'synthetic-shapes' takes no source, got {request.source!r}")
    sizes = {k: int(request.option(k, v)) for k, v in SYNTHETIC_SHAPES_DEFAULTS.items()}
    key = (
        f"v{synthetic_shapes.GENERATOR_VERSION}-r{request.resolution}-seed{sizes['seed']}"
        f"-{sizes['train']}-{sizes['val']}-{sizes['test']}"
    )
    root = data_root / key
    if (root / "meta.json").is_file():
        return PreparedDataset.open(root)
    total = sizes["train"] + sizes["val"] + sizes["test"]
    log.info("generating synthetic-shapes %s (%d images)", key, total)
    num_classes = len(synthetic_shapes.CLASS_NAMES)
    labels, split = [], []
    with PreparedDatasetWriter(
        root, num_images=total, image_shape=(request.resolution, request.resolution, 3)
    ) as writer:
        offset = 0
        for split_id, split_name in enumerate(("train", "val", "test")):
            images, split_labels = synthetic_shapes.generate_shapes_split(
                request.resolution, sizes[split_name], seed=sizes["seed"], split_id=split_id
            )
            writer.images[offset : offset + len(images)] = images
            offset += len(images)
            labels.append(split_labels)
            split.append(np.full(len(images), split_id))
        labels_all = np.concatenate(labels)
        return writer.finish(
            meta={
                "name": request.name,
                "version": key,
                "resolution": request.resolution,
                "label_names": list(synthetic_shapes.CLASS_NAMES),
                "task": "multiclass",
                "augment": "natural",
                "source": "procedural",
            },
            targets=np.eye(num_classes, dtype=np.float32)[labels_all],
            split=np.concatenate(split),
            grades=labels_all,
        )
