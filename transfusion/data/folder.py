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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.data.build import AUGMENT_POLICIES, SPLIT_CODES, label_strata, read_csv, split_by_strata
from transfusion.data.declared import DatasetDeclaration, DeclaredSource, ImageListing, LabelledImageSet
from transfusion.data.imaging import CROPS

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
)
_BINARY = {"1": 1.0, "1.0": 1.0, "true": 1.0, "0": 0.0, "0.0": 0.0, "false": 0.0, "": math.nan}


@dataclass(frozen=True)
class FolderOptions:
    csv: str
    image_column: str
    split_column: str | None
    patient_column: str | None
    image_dir: str
    image_suffix: str
    task: str
    channels: int
    crop: str
    augment: str
    val_fraction: float
    test_fraction: float
    split_seed: int


def read_folder_options(given: DeclaredSource) -> FolderOptions:
    o = given.options
    return FolderOptions(
        csv=o.text("csv", "labels.csv") or "labels.csv",
        image_column=o.text("image_column", "image") or "image",
        split_column=o.text("split_column", None),
        patient_column=o.text("patient_column", None),
        image_dir=(o.text("image_dir", "") or "").strip("/"),
        image_suffix=o.text("image_suffix", "") or "",
        task=o.choice("task", "binary", ("binary", "multiclass")),
        channels=int(o.choice("channels", "3", ("1", "3"))),
        crop=o.choice("crop", "center", CROPS),
        augment=o.choice("augment", "none", AUGMENT_POLICIES),
        val_fraction=o.fraction("val_fraction", 0.1) or 0.0,
        test_fraction=o.fraction("test_fraction", 0.2) or 0.0,
        split_seed=o.integer("split_seed", 0),
    )


def _row_labels(row: dict[str, str], columns: list[str], *, task: str, where: str) -> list[float] | str:
    """A binary row's 0/1/blank (NaN: unknown) per column, or a multiclass row's class name."""
    if task == "multiclass":
        if not row[columns[0]]:
            raise ValueError(f"{where} column {columns[0]!r}: empty class")
        return row[columns[0]]
    for column in columns:
        if row[column].lower() not in _BINARY:
            raise ValueError(f"{where} column {column!r}: unknown label value {row[column]!r} (expected 1, 0 or blank)")
    return [_BINARY[row[column].lower()] for column in columns]


def read_folder_rows(given: DeclaredSource, opts: FolderOptions) -> LabelledImageSet:
    """One CSV row per image: path, labels, and optionally split and patient columns."""
    csv_path = given.source.root / opts.csv
    special = [c for c in (opts.image_column, opts.split_column, opts.patient_column) if c]
    # label_columns is read here, after the version key: it is keyed by the CSV's content.
    rows = read_csv(csv_path, required=special + list(given.options.names("label_columns", None) or []))
    header = list(rows[0][1])
    label_columns = given.options.names("label_columns", None) or [c for c in header if c not in special]
    if not label_columns:
        raise ValueError(f"{csv_path}: no label columns (columns: {', '.join(header)})")
    if opts.task == "multiclass" and len(label_columns) != 1:
        raise ValueError(f"task=multiclass needs exactly one label column, got {', '.join(label_columns)}")

    listing, raw_labels, splits, patients = ImageListing(given.source.root), [], [], []
    for line, row in rows:
        where = f"{csv_path} line {line}"
        relative = row[opts.image_column] + opts.image_suffix
        listing.add(f"{opts.image_dir}/{relative}" if opts.image_dir else relative, where=where,
                    column=opts.image_column)  # fmt: skip
        if opts.split_column:
            value = row[opts.split_column].lower()
            if value not in SPLIT_CODES:
                raise ValueError(
                    f"{where} column {opts.split_column!r}: unknown split {row[opts.split_column]!r} "
                    "(expected train, val or test)"
                )
            splits.append(SPLIT_CODES[value])
        if opts.patient_column:
            if not row[opts.patient_column]:
                raise ValueError(f"{where} column {opts.patient_column!r}: empty patient id")
            patients.append(row[opts.patient_column])
        raw_labels.append(_row_labels(row, label_columns, task=opts.task, where=where))

    grades = None
    if opts.task == "binary":
        targets = np.asarray(raw_labels, dtype=np.float32).reshape(len(listing), len(label_columns))
        label_names = list(label_columns)
        strata = label_strata(targets)
    else:
        label_names = sorted(set(raw_labels))
        grades = np.asarray([label_names.index(v) for v in raw_labels], dtype=np.int64)
        targets = np.eye(len(label_names), dtype=np.float32)[grades]
        strata = grades
    groups = np.asarray(patients) if opts.patient_column else None
    if opts.split_column:
        split = np.asarray(splits, dtype=np.int8)
        if groups is not None:
            _check_patient_separation(groups, split, csv_path, opts.patient_column)
        rule = f"column {opts.split_column!r}"
    else:
        split = split_by_strata(strata, groups=groups, val_fraction=opts.val_fraction,
                                test_fraction=opts.test_fraction, seed=opts.split_seed)  # fmt: skip
        rule = f"seeded stratified split (seed {opts.split_seed}, val {opts.val_fraction}, test {opts.test_fraction})"
    return LabelledImageSet(
        targets=targets,
        split=split,
        label_names=label_names,
        task=opts.task,
        augment=opts.augment,
        split_rule=rule,
        channels=opts.channels,
        origin=str(csv_path),
        listing=listing,
        crop=opts.crop,
        grades=grades,
        groups=groups,
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


FOLDER = DatasetDeclaration(
    recipe=RECIPE_VERSION,
    options=FOLDER_OPTIONS,
    needs="a folder or s3:// prefix holding the index CSV named by option csv, by default labels.csv",
    read_options=read_folder_options,
    index=lambda given, opts: {"index": given.source.fingerprint(opts.csv)},
    read_rows=read_folder_rows,
)
FOLDER.register("folder", doc="Images listed in a CSV with label columns; see the module docstring for options.")
