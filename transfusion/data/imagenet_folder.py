"""``imagenet-folder``: an ImageNet-style class folder, the source set for pretraining.

Layout ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (any image suffix), on disk
or under an ``s3://`` prefix. Classes are the sorted ``train/`` sub-folders; the
``val/`` images are split alternately into validation and test. ``per_class`` caps the
training images of each class (e.g. an ImageNet-100-sized subset for a quick pretrain).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.data.declared import DatasetDeclaration, DeclaredSource, ImageListing, LabelledImageSet
from transfusion.data.sources import DataSource

RECIPE_VERSION = 1
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
OPTIONS = ("per_class",)


@dataclass(frozen=True)
class ClassFolders:
    """The images of ``train/<class>/`` and ``val/<class>/``, in listing order."""

    classes: list[str]
    files: list[Path]
    labels: list[int]
    split: list[int]


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_class_folders(source: DataSource, per_class: int) -> ClassFolders:
    """Classes are the sorted ``train/`` sub-folders; ``per_class`` caps their training images."""
    train_dir, val_dir = source.root / "train", source.root / "val"
    for directory in (train_dir, val_dir):
        if not directory.is_dir():
            raise ValueError(f"{directory} does not exist: expected train/<class>/ and val/<class>/ under {source.uri}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{train_dir} holds {len(classes)} class folders; a classification source needs at least 2")
    folders = ClassFolders(classes, [], [], [])
    for label, name in enumerate(classes):
        train_images = _images(train_dir / name)[: per_class or None]
        val_images = _images(val_dir / name) if (val_dir / name).is_dir() else []
        folders.files.extend(train_images + val_images)
        folders.labels.extend([label] * (len(train_images) + len(val_images)))
        # Alternate val images between validation and test so both see every class.
        folders.split.extend([0] * len(train_images) + [1 + (i % 2) for i in range(len(val_images))])
    return folders


def imagenet_index(given: DeclaredSource, per_class: int) -> dict[str, object]:
    """The listing (paths and sizes) is the index: a folder has no index file to fingerprint."""
    root = given.source.root
    files = list_class_folders(given.source, per_class).files
    listing = hashlib.sha256("\n".join(f"{f.relative_to(root)}:{f.stat().st_size}" for f in files).encode())
    return {"index": listing.hexdigest()}


def read_imagenet_rows(given: DeclaredSource, per_class: int) -> LabelledImageSet:
    folders = list_class_folders(given.source, per_class)
    listing = ImageListing(given.source.root)
    for file in folders.files:
        listing.add(str(file.relative_to(given.source.root)), where=str(file.parent))
    labels = np.asarray(folders.labels, dtype=np.int64)
    return LabelledImageSet(
        targets=np.eye(len(folders.classes), dtype=np.float32)[labels],
        split=np.asarray(folders.split, dtype=np.int8),
        label_names=folders.classes,
        task="multiclass",
        augment="natural",
        split_rule="train/ is training; val/ alternates validation and test",
        channels=3,
        origin=str(given.source.root),
        listing=listing,
        grades=labels,
    )


IMAGENET_FOLDER = DatasetDeclaration(
    recipe=RECIPE_VERSION,
    options=OPTIONS,
    needs="a folder or s3:// prefix with train/ and val/",
    read_options=lambda given: given.options.integer("per_class", 0, low=0),
    index=imagenet_index,
    read_rows=read_imagenet_rows,
    accepts_file=True,
)
IMAGENET_FOLDER.register("imagenet-folder", doc="Many-class natural images from train/<class>/ and val/<class>/.")
