"""The one template every source-backed dataset is prepared by: a declaration plus a row reader.

A dataset declares its recipe version, its options and what its source must be, and
supplies three small functions: ``read_options`` (typed options), ``index`` (the
version-key parts naming its index files' content) and ``read_rows`` (its index rows as
a :class:`LabelledImageSet`). :func:`prepare_declared` does the rest, the same for all:
resolve the source, build the version key, open the set if prepared, refuse empty
splits and labels outside ``[0, 1]``, decode/crop/resize every image and write it with
the common metadata. Paths escaping the source (text or symlink) and an image listed
twice are refused by :class:`ImageListing`, which every file-backed reader lists through.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transfusion.data import DATASET_VERSIONS, DATASETS, RUNTIME_OPTIONS, DatasetVersion, PrepareRequest, imaging
from transfusion.data.build import (
    DatasetOptions,
    FirstListing,
    LabelledImages,
    check_splits,
    home_of,
    member_path,
    open_if_prepared,
    version_key,
    write_prepared,
)
from transfusion.data.prepared import PreparedDataset
from transfusion.data.sources import DataSource, open_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeclaredSource:
    """What a declaration's functions are given: the dataset name, its source and options."""

    name: str
    source: DataSource
    options: DatasetOptions
    resolution: int


class ImageListing:
    """The image files an index lists, each resolved inside the source root and listed once.

    A path that leaves the root (``..``, absolute, or a symlink pointing out) is refused
    naming its row and column; the same file listed twice (under any spelling) is refused
    naming both rows: it could carry conflicting labels and land in train and test.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: list[str] = []
        self.files: list[Path] = []
        self._first = FirstListing()

    def add(self, relative: str, *, where: str, column: str | None = None) -> None:
        """Lists ``relative`` from row ``where`` (file and line), read from ``column``."""
        file = member_path(self.root, relative, where=f"{where} column {column!r}" if column else where)
        self._first.add(file, name=relative, where=where)
        self.files.append(file)
        self.names.append(relative)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class LabelledImageSet:
    """What a row reader returns: one row per image, its labels and how to describe them.

    Either ``listing`` (files to decode, cropped by ``crop``) or ``names`` plus ``load``
    (images already in memory) says where the pixels come from.
    """

    targets: np.ndarray
    split: np.ndarray
    label_names: list[str]
    task: str
    augment: str
    split_rule: str
    channels: int
    origin: str
    listing: ImageListing | None = None
    crop: str = "center"
    names: list[str] | None = None
    load: Callable[[int], np.ndarray] | None = None
    grades: np.ndarray | None = None
    groups: np.ndarray | None = None
    meta: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetDeclaration:
    """A source-backed dataset as data: see the module docstring.

    Attributes:
        recipe: bumped when the preparation changes what it produces (part of the key).
        options: the dataset's own option names (``skip_bad`` and ``workers`` are added).
        needs: what the source must be, for the error when it is missing or wrong.
        read_options: typed options, read from the source where a default depends on it.
        index: version-key parts naming the index content (fingerprints, listings).
        read_rows: the labelled rows, read only when the set is not prepared yet.
        accepts_file: whether the source may be a single file rather than a folder.
        decodes_files: False where pixels come from arrays, so no file can be bad.
    """

    recipe: str | int
    options: tuple[str, ...]
    needs: str
    read_options: Callable[[DeclaredSource], Any]
    index: Callable[[DeclaredSource, Any], dict[str, object]]
    read_rows: Callable[[DeclaredSource, Any], LabelledImageSet]
    accepts_file: bool = False
    decodes_files: bool = True

    def register(self, name: str, *, doc: str) -> None:
        """Registers this dataset in ``DATASETS`` under ``name``."""

        def prepare(request: PrepareRequest, data_root: Path) -> PreparedDataset:
            return prepare_declared(self, request, data_root)

        def version(request: PrepareRequest, data_root: Path) -> DatasetVersion:
            return declared_version(self, request, data_root)

        prepare.__doc__ = doc
        DATASETS.register(name)(prepare)
        DATASET_VERSIONS.register(name)(version)


def _open_declared_source(declaration: DatasetDeclaration, request: PrepareRequest, data_root: Path) -> DataSource:
    if not request.source:
        raise ValueError(f"dataset {request.name!r} needs a source: {declaration.needs}")
    source = open_source(request.source, home=home_of(data_root))
    if source.file is not None and not declaration.accepts_file:
        raise ValueError(f"dataset {request.name!r} needs {declaration.needs}, got the file {request.source}")
    return source


def _refuse_labels_out_of_range(rows: LabelledImageSet, *, name: str) -> None:
    """Targets are probabilities of a positive label (NaN = ignored): anything else is a reader bug."""
    n = len(rows.split)
    if rows.targets.shape != (n, len(rows.label_names)):
        raise ValueError(
            f"dataset {name!r}: targets of shape {rows.targets.shape} for {n} images and {len(rows.label_names)} labels"
        )
    bad = np.flatnonzero(np.any((rows.targets < 0) | (rows.targets > 1), axis=1))
    if len(bad):
        raise ValueError(f"dataset {name!r} ({rows.origin}): image {bad[0]} has labels outside [0, 1]")


def _as_labelled_images(rows: LabelledImageSet, *, resolution: int) -> LabelledImages:
    if rows.listing is not None:
        files, channels, crop = rows.listing.files, rows.channels, rows.crop

        def load(i: int) -> np.ndarray:
            return imaging.load_image(files[i], resolution=resolution, channels=channels, crop=crop)

        names = rows.listing.names
    else:
        names, load = rows.names, rows.load
    return LabelledImages(
        names=names, load=load, targets=rows.targets, split=rows.split, grades=rows.grades, groups=rows.groups
    )


@dataclass(frozen=True)
class _Keyed:
    """A declared dataset's version key with what computing it read (the source, its options)."""

    key: str
    given: DeclaredSource
    typed: Any
    skip_bad: bool
    workers: int


def _declared_key(declaration: DatasetDeclaration, request: PrepareRequest, data_root: Path) -> _Keyed:
    """The version key: recipe, source identity, options and index fingerprints -- no image read."""
    options = DatasetOptions(request, declaration.options + RUNTIME_OPTIONS)
    source = _open_declared_source(declaration, request, data_root)
    given = DeclaredSource(request.name, source, options, request.resolution)
    typed = declaration.read_options(given)
    skip_bad = options.boolean("skip_bad", False)
    workers = options.integer("workers", 2, low=1)
    parts = {"recipe": declaration.recipe, "source": source.identity, "options": options.key_part()}
    key = version_key(resolution=request.resolution, parts={**parts, **declaration.index(given, typed)})
    return _Keyed(key, given, typed, skip_bad, workers)


def declared_version(declaration: DatasetDeclaration, request: PrepareRequest, data_root: Path) -> DatasetVersion:
    """The version preparing would give, and the training pool's size if the set is prepared already."""
    keyed = _declared_key(declaration, request, data_root)
    meta = data_root / keyed.key / "meta.json"
    train = json.loads(meta.read_text()).get("counts", {}).get("train") if meta.is_file() else None
    return DatasetVersion(keyed.key, None if train is None else int(train))


def prepare_declared(declaration: DatasetDeclaration, request: PrepareRequest, data_root: Path) -> PreparedDataset:
    """Prepares (or opens, if prepared) the dataset ``declaration`` describes for ``request``."""
    keyed = _declared_key(declaration, request, data_root)
    key, given, typed, skip_bad, workers = keyed.key, keyed.given, keyed.typed, keyed.skip_bad, keyed.workers
    source, options = given.source, given.options
    root = data_root / key
    # Arrays cannot hold a bad file: a set prepared from them opens whatever skip_bad says.
    found = open_if_prepared(root, skip_bad=skip_bad or not declaration.decodes_files)
    if found is not None:
        return found

    rows = declaration.read_rows(given, typed)
    check_splits(rows.split, name=request.name, origin=rows.origin)
    _refuse_labels_out_of_range(rows, name=request.name)
    table = _as_labelled_images(rows, resolution=request.resolution)
    log.info("preparing %s %s: %d images from %s", request.name, key, len(table.names), source.uri)
    meta = {
        "name": request.name,
        "version": key,
        "resolution": request.resolution,
        "label_names": list(rows.label_names),
        "task": rows.task,
        "augment": rows.augment,
        "source": source.uri,
        "source_identity": source.identity,
        "options": options.key_part(),
        "split_rule": rows.split_rule,
        **rows.meta,
    }
    return write_prepared(
        root,
        table,
        meta=meta,
        resolution=request.resolution,
        channels=rows.channels,
        skip_bad=skip_bad and declaration.decodes_files,
        workers=workers,
    )
