"""``imagenet-folder``: an ImageNet-style class folder, the source set for pretraining.

Layout ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (any image suffix), on disk
or under an ``s3://`` prefix. Classes are the sorted ``train/`` sub-folders; the
``val/`` images are split alternately into validation and test. ``per_class`` caps the
training images of each class (e.g. an ImageNet-100-sized subset for a quick pretrain).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from transfusion.data import DATASETS, PrepareRequest, imaging
from transfusion.data.build import (
    DatasetOptions,
    LabelledImages,
    check_splits,
    home_of,
    inside_root,
    open_if_prepared,
    version_key,
    write_prepared,
)
from transfusion.data.prepared import PreparedDataset
from transfusion.data.sources import open_source

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
OPTIONS = ("per_class", "skip_bad", "workers")


def _images(directory: Path, root: Path) -> list[Path]:
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for path in found:
        inside_root(root, path, where=str(directory))
    return found


@DATASETS.register("imagenet-folder")
def prepare_imagenet_folder(request: PrepareRequest, data_root: Path) -> PreparedDataset:
    """Many-class natural images from ``train/<class>/`` and ``val/<class>/`` folders."""
    options = DatasetOptions(request, OPTIONS)
    per_class = options.integer("per_class", 0, low=0)
    skip_bad = options.boolean("skip_bad", False)
    workers = options.integer("workers", 2, low=1)
    if not request.source:
        raise ValueError("dataset 'imagenet-folder' needs a source: a folder or s3:// prefix with train/ and val/")
    source = open_source(request.source, home=home_of(data_root))
    train_dir, val_dir = source.root / "train", source.root / "val"
    for directory in (train_dir, val_dir):
        if not directory.is_dir():
            raise ValueError(f"{directory} does not exist: expected train/<class>/ and val/<class>/ under {source.uri}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{train_dir} holds {len(classes)} class folders; a classification source needs at least 2")

    files, labels, split = [], [], []
    for label, name in enumerate(classes):
        train_images = _images(train_dir / name, source.root)
        if per_class:
            train_images = train_images[:per_class]
        val_images = _images(val_dir / name, source.root) if (val_dir / name).is_dir() else []
        files += train_images + val_images
        labels += [label] * (len(train_images) + len(val_images))
        # Alternate val images between validation and test so both see every class.
        split += [0] * len(train_images) + [1 + (i % 2) for i in range(len(val_images))]
    split_all = np.asarray(split, dtype=np.int8)
    check_splits(split_all, name=request.name, origin=str(source.root))
    listing = hashlib.sha256("\n".join(f"{f.relative_to(source.root)}:{f.stat().st_size}" for f in files).encode())
    key = version_key(
        resolution=request.resolution,
        parts={"recipe": RECIPE_VERSION, "source": source.identity, "index": listing.hexdigest(),
               "options": options.key_part()},
    )  # fmt: skip
    root = data_root / key
    found = open_if_prepared(root, skip_bad=skip_bad)
    if found is not None:
        return found
    resolution = request.resolution

    def load(i: int) -> np.ndarray:
        return imaging.load_image(files[i], resolution=resolution, channels=3, crop="center")

    labels_all = np.asarray(labels, dtype=np.int64)
    table = LabelledImages(
        names=[str(f.relative_to(source.root)) for f in files],
        load=load,
        targets=np.eye(len(classes), dtype=np.float32)[labels_all],
        split=split_all,
        grades=labels_all,
    )
    log.info("preparing imagenet-folder %s: %d images, %d classes", key, len(files), len(classes))
    return write_prepared(
        root,
        table,
        meta={
            "name": request.name,
            "version": key,
            "resolution": resolution,
            "label_names": classes,
            "task": "multiclass",
            "augment": "natural",
            "source": source.uri,
            "source_identity": source.identity,
            "options": options.key_part(),
            "split_rule": "train/ is training; val/ alternates validation and test",
        },
        resolution=resolution,
        channels=3,
        skip_bad=skip_bad,
        workers=workers,
    )
