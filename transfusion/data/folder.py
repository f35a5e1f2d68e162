"""A generic labelled image folder: one CSV row per image, labels in columns.

Options (all optional except where the defaults do not fit):

- ``csv`` (``labels.csv``), ``image_column`` (``image``): the index and its path column,
  paths relative to the source folder, optionally under ``image_dir`` and with
  ``image_suffix`` appended (for CSVs that hold ids, not file names);
- ``label_columns``: the label columns (default: every other column). With
  ``task=binary`` (default) each is 0/1, blank = unknown (ignored); with
  ``task=multiclass`` one column holds class names, one-hot encoded;
- ``split_column`` (values train/val/test) or a seeded split stratified by label
  (``val_fraction`` 0.1, ``test_fraction`` 0.2, ``split_seed`` 0), by patient where
  ``patient_column`` is given;
- ``channels`` (3 or 1), ``crop`` (``center``/``fundus``/``none``), ``augment``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from transfusion.data import DATASETS, PrepareRequest, imaging
from transfusion.data.build import (
    AUGMENT_POLICIES,
    SPLIT_CODES,
    DatasetOptions,
    FirstListing,
    LabelledImages,
    check_splits,
    home_of,
    label_strata,
    member_path,
    open_if_prepared,
    read_csv,
    split_by_strata,
    version_key,
    write_prepared,
)
from transfusion.data.imaging import CROPS
from transfusion.data.prepared import PreparedDataset
from transfusion.data.sources import open_source

log = logging.getLogger(__name__)

RECIPE_VERSION = "1"
FOLDER_OPTIONS = (
    "csv",
    "image_column",
    "label_columns",
    "split_column",
    "patient_column",
    "image_dir",
    "image_suffix",
    "task",
    "channels",
    "crop",
    "augment",
    "val_fraction",
    "test_fraction",
    "split_seed",
    "skip_bad",
    "workers",
)
_BINARY = {"1": 1.0, "1.0": 1.0, "true": 1.0, "0": 0.0, "0.0": 0.0, "false": 0.0, "": math.nan}


@DATASETS.register("folder")
def prepare_folder(request: PrepareRequest, data_root: Path) -> PreparedDataset:
    """Images listed in a CSV with label columns; see the module docstring for options."""
    options = DatasetOptions(request, FOLDER_OPTIONS)
    csv_name = options.text("csv", "labels.csv") or "labels.csv"
    image_column = options.text("image_column", "image") or "image"
    split_column = options.text("split_column", None)
    patient_column = options.text("patient_column", None)
    image_dir = (options.text("image_dir", "") or "").strip("/")
    image_suffix = options.text("image_suffix", "") or ""
    task = options.choice("task", "binary", ("binary", "multiclass"))
    channels = int(options.choice("channels", "3", ("1", "3")))
    crop = options.choice("crop", "center", CROPS)
    augment = options.choice("augment", "none", AUGMENT_POLICIES)
    val_fraction = options.fraction("val_fraction", 0.1) or 0.0
    test_fraction = options.fraction("test_fraction", 0.2) or 0.0
    split_seed = options.integer("split_seed", 0)
    skip_bad = options.boolean("skip_bad", False)
    workers = options.integer("workers", 2, low=1)
    if not request.source:
        raise ValueError(f"dataset 'folder' needs a source: the folder or s3:// prefix holding {csv_name}")
    source = open_source(request.source, home=home_of(data_root))
    if source.file is not None:
        raise ValueError(f"dataset 'folder' needs a folder holding {csv_name}, got the file {request.source}")
    key = version_key(
        resolution=request.resolution,
        parts={
            "recipe": RECIPE_VERSION,
            "source": source.identity,
            "index": source.fingerprint(csv_name),
            "options": options.key_part(),
        },
    )
    root = data_root / key
    found = open_if_prepared(root, skip_bad=skip_bad)
    if found is not None:
        return found

    csv_path = source.root / csv_name
    special = [c for c in (image_column, split_column, patient_column) if c]
    rows = read_csv(csv_path, required=special + list(options.names("label_columns", None) or []))
    header = list(rows[0][1])
    label_columns = options.names("label_columns", None) or [c for c in header if c not in special]
    if not label_columns:
        raise ValueError(f"{csv_path}: no label columns (columns: {', '.join(header)})")
    if task == "multiclass" and len(label_columns) != 1:
        raise ValueError(f"task=multiclass needs exactly one label column, got {', '.join(label_columns)}")

    names, files, raw_labels, splits, patients = [], [], [], [], []
    listed = FirstListing()
    for line, row in rows:
        where = f"{csv_path} line {line}"
        relative = row[image_column] + image_suffix
        relative = f"{image_dir}/{relative}" if image_dir else relative
        files.append(member_path(source.root, relative, where=f"{where} column {image_column!r}"))
        listed.add(files[-1], name=relative, where=where)
        names.append(relative)
        if split_column:
            value = row[split_column].lower()
            if value not in SPLIT_CODES:
                raise ValueError(
                    f"{where} column {split_column!r}: unknown split {row[split_column]!r} "
                    "(expected train, val or test)"
                )
            splits.append(SPLIT_CODES[value])
        if patient_column:
            if not row[patient_column]:
                raise ValueError(f"{where} column {patient_column!r}: empty patient id")
            patients.append(row[patient_column])
        if task == "binary":
            values = []
            for column in label_columns:
                value = row[column].lower()
                if value not in _BINARY:
                    raise ValueError(
                        f"{where} column {column!r}: unknown label value {row[column]!r} (expected 1, 0 or blank)"
                    )
                values.append(_BINARY[value])
            raw_labels.append(values)
        else:
            value = row[label_columns[0]]
            if not value:
                raise ValueError(f"{where} column {label_columns[0]!r}: empty class")
            raw_labels.append(value)

    grades = None
    if task == "binary":
        targets = np.asarray(raw_labels, dtype=np.float32).reshape(len(names), len(label_columns))
        label_names = list(label_columns)
        strata = label_strata(targets)
    else:
        label_names = sorted(set(raw_labels))
        grades = np.asarray([label_names.index(v) for v in raw_labels], dtype=np.int64)
        targets = np.eye(len(label_names), dtype=np.float32)[grades]
        strata = grades
    groups = np.asarray(patients) if patient_column else None
    if split_column:
        split = np.asarray(splits, dtype=np.int8)
        if groups is not None:
            _check_patient_separation(groups, split, csv_path, patient_column)
    else:
        split = split_by_strata(
            strata,
            groups=groups,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=split_seed,
        )
    check_splits(split, name=request.name, origin=str(csv_path))
    resolution = request.resolution

    def load(i: int) -> np.ndarray:
        return imaging.load_image(files[i], resolution=resolution, channels=channels, crop=crop)

    table = LabelledImages(names=names, load=load, targets=targets, split=split, grades=grades, groups=groups)
    log.info("preparing folder %s: %d images from %s", key, len(names), source.uri)
    return write_prepared(
        root,
        table,
        meta={
            "name": request.name,
            "version": key,
            "resolution": resolution,
            "label_names": label_names,
            "task": task,
            "augment": augment,
            "source": source.uri,
            "source_identity": source.identity,
            "options": options.key_part(),
            "split_rule": f"column {split_column!r}"
            if split_column
            else f"seeded stratified split (seed {split_seed}, val {val_fraction}, test {test_fraction})",
        },
        resolution=resolution,
        channels=channels,
        skip_bad=skip_bad,
        workers=workers,
    )


def _check_patient_separation(groups: np.ndarray, split: np.ndarray, csv_path: Path, column: str) -> None:
    patients, inverse = np.unique(groups, return_inverse=True)
    lowest = np.full(len(patients), 9, dtype=np.int64)
    highest = np.full(len(patients), -1, dtype=np.int64)
    np.minimum.at(lowest, inverse, split)
    np.maximum.at(highest, inverse, split)
    mixed = np.flatnonzero(lowest != highest)
    if len(mixed):
        raise ValueError(f"{csv_path} column {column!r}: patient {patients[mixed[0]]!r} appears in more than one split")
