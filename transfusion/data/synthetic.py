"""Preparers for the procedural datasets (no source needed).

Every procedural set is generated split by split, deterministic in (seed, split,
index), cached under a key of its generator version, resolution, seed and sizes, and
written atomically like any prepared dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transfusion.data import DATASET_VERSIONS, DATASETS, RUNTIME_OPTIONS, DatasetVersion, PrepareRequest
from transfusion.data.prepared import PreparedDataset, PreparedDatasetWriter
from transfusion.data.summary import label_summary

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class ProceduralSet:
    """How one procedural dataset is generated and labelled."""

    version: str
    defaults: dict[str, int]
    channels: int
    # (resolution, count, seed, split_id) -> (uint8 images, per-image labels)
    generate: Callable[..., tuple[np.ndarray, np.ndarray]]
    # per-image labels -> (N, L) float32 targets
    targets: Callable[[np.ndarray], np.ndarray]
    meta: dict = field(default_factory=dict)
    labels_are_grades: bool = True


def procedural_version(spec: ProceduralSet, request: PrepareRequest) -> tuple[str, dict[str, int]]:
    """The version key of ``spec`` for ``request`` and its sizes and seed: its generator's parameters."""
    if request.source not in (None, "", "synthetic"):
        raise ValueError(f"dataset {request.name!r} takes no source, got {request.source!r}")
    unknown = sorted(set(dict(request.options)) - {*spec.defaults, *RUNTIME_OPTIONS})
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for dataset {request.name!r}; valid: {', '.join(spec.defaults)}"
        )
    sizes = {k: int(request.option(k, v)) for k, v in spec.defaults.items()}
    for split in SPLIT_NAMES:
        if sizes[split] < 1:
            raise ValueError(f"{request.name} {split} size must be >= 1, got {sizes[split]}")
    key = f"v{spec.version}-r{request.resolution}-seed{sizes['seed']}-{sizes['train']}-{sizes['val']}-{sizes['test']}"
    return key, sizes


def prepare_procedural(spec: ProceduralSet, request: PrepareRequest, data_root: Path) -> PreparedDataset:
    """Generates (once) and opens the procedural dataset ``spec`` for ``request``."""
    key, sizes = procedural_version(spec, request)
    root = data_root / key
    if (root / "meta.json").is_file():
        return PreparedDataset.open(root)
    total = sum(sizes[s] for s in SPLIT_NAMES)
    log.info("generating %s %s (%d images)", request.name, key, total)
    shape = (request.resolution, request.resolution, spec.channels)
    labels, split = [], []
    with PreparedDatasetWriter(root, num_images=total, image_shape=shape) as writer:
        offset = 0
        for split_id, split_name in enumerate(SPLIT_NAMES):
            images, split_labels = spec.generate(
                request.resolution, sizes[split_name], seed=sizes["seed"], split_id=split_id
            )
            writer.images[offset : offset + len(images)] = images.reshape(len(images), *shape)
            offset += len(images)
            labels.append(split_labels)
            split.append(np.full(len(images), split_id))
        labels_all, split_all = np.concatenate(labels), np.concatenate(split)
        targets = spec.targets(labels_all)
        return writer.finish(
            meta={
                "name": request.name,
                "version": key,
                "resolution": request.resolution,
                "source": "procedural",
                "channels": spec.channels,
                "summary": label_summary(targets, split_all, list(spec.meta["label_names"])),
                "skipped": 0,
                "skipped_files": [],
                **spec.meta,
            },
            targets=targets,
            split=split_all,
            grades=labels_all if spec.labels_are_grades else None,
        )


# Names of the procedural sets: prepared from nothing, so any machine can make them.
PROCEDURAL_DATASETS: set[str] = set()


def _register(name: str, spec_factory: Callable[[], ProceduralSet], doc: str) -> None:
    PROCEDURAL_DATASETS.add(name)

    def prepare(request: PrepareRequest, data_root: Path) -> PreparedDataset:
        return prepare_procedural(spec_factory(), request, data_root)

    def version(request: PrepareRequest, data_root: Path) -> DatasetVersion:
        key, sizes = procedural_version(spec_factory(), request)
        return DatasetVersion(key, sizes["train"])  # the generator makes exactly this many

    prepare.__doc__ = doc
    DATASETS.register(name)(prepare)
    DATASET_VERSIONS.register(name)(version)


def synthetic_retina_set() -> ProceduralSet:
    from transfusion.data import synthetic_retina as retina

    return ProceduralSet(
        version=retina.GENERATOR_VERSION,
        defaults={"train": 3000, "val": 400, "test": 800, "seed": 0},
        channels=3,
        generate=retina.generate_split,
        targets=lambda grades: (grades >= 2).astype(np.float32)[:, None],
        meta={
            "label_names": ["referable_dr"],
            "task": "binary",
            "augment": "fundus",
            "grade_names": list(retina.GRADE_NAMES),
        },  # fmt: skip
    )


def synthetic_shapes_set() -> ProceduralSet:
    from transfusion.data import synthetic_shapes as shapes

    classes = len(shapes.CLASS_NAMES)
    return ProceduralSet(
        version=shapes.GENERATOR_VERSION,
        defaults={"train": 4000, "val": 400, "test": 400, "seed": 0},
        channels=3,
        generate=shapes.generate_shapes_split,
        targets=lambda labels: np.eye(classes, dtype=np.float32)[labels],
        meta={"label_names": list(shapes.CLASS_NAMES), "task": "multiclass", "augment": "natural"},
    )


def synthetic_chest_set() -> ProceduralSet:
    from transfusion.data import synthetic_chest as chest

    return ProceduralSet(
        version=chest.GENERATOR_VERSION,
        defaults=dict(chest.SYNTHETIC_CHEST_DEFAULTS),
        channels=1,
        generate=chest.generate_chest_split,
        targets=lambda labels: labels.astype(np.float32),
        meta={"label_names": list(chest.LABEL_NAMES), "task": "binary", "augment": "xray"},
        labels_are_grades=False,
    )


_register("synthetic-retina", synthetic_retina_set, "Procedural fundus images; target: referable DR (grade >= 2).")
_register(
    "synthetic-shapes", synthetic_shapes_set, "Procedural shapes, textures, colours (16 classes): the offline source."
)
_register("synthetic-chest", synthetic_chest_set, "Procedural chest X-rays; five local multi-label findings.")
