"""Fundus photographs graded for diabetic retinopathy: Kaggle/EyePACS and APTOS 2019.

The target is referable DR (grade >= 2, moderate or worse), the paper's Retina task; the
five grades are kept in ``grades.npy``. Only the labelled training images of the public
releases are used: validation and test splits are a seeded split stratified by grade
(EyePACS keeps both eyes of a patient in one split). Images are cropped to a square
around the retina disc and resized (587 px by default, as in the paper).

- ``retina-eyepacs``: ``trainLabels.csv`` (``image,level``) + ``train/<image>.jpeg``
- ``retina-aptos``: ``train.csv`` (``id_code,diagnosis``) + ``train_images/<id_code>.png``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.data.build import AUGMENT_POLICIES, parse_grade, read_csv, split_by_strata
from transfusion.data.declared import DatasetDeclaration, DeclaredSource, ImageListing, LabelledImageSet
from transfusion.data.synthetic_retina import GRADE_NAMES

RECIPE_VERSION = "1"
RETINA_OPTIONS = ("val_fraction", "test_fraction", "split_seed", "image_dir", "image_ext", "augment")


@dataclass(frozen=True)
class RetinaFormat:
    """Where a public fundus release keeps its labels and images."""

    csv: str
    image_column: str
    grade_column: str
    image_dir: str
    image_ext: str
    # Image id -> patient id, where the release names both eyes of a patient.
    patient_of: Callable[[str], str] | None = None


RETINA_FORMATS: dict[str, RetinaFormat] = {
    # EyePACS names images "<patient>_left" / "<patient>_right".
    "retina-eyepacs": RetinaFormat(
        "trainLabels.csv", "image", "level", "train", ".jpeg", lambda i: i.rsplit("_", 1)[0]
    ),
    "retina-aptos": RetinaFormat("train.csv", "id_code", "diagnosis", "train_images", ".png"),
}


@dataclass(frozen=True)
class RetinaOptions:
    fmt: RetinaFormat
    val_fraction: float | None
    test_fraction: float | None
    split_seed: int
    image_dir: str
    image_ext: str
    augment: str


def read_retina_rows(given: DeclaredSource, opts: RetinaOptions) -> LabelledImageSet:
    """One row per ``image,grade`` line; the target is referable DR (grade >= 2)."""
    fmt = opts.fmt
    csv_path = given.source.root / fmt.csv
    listing, grades = ImageListing(given.source.root), []
    for line, row in read_csv(csv_path, required=(fmt.image_column, fmt.grade_column)):
        image = f"{row[fmt.image_column]}{opts.image_ext}"
        listing.add(f"{opts.image_dir}/{image}" if opts.image_dir else image, where=f"{csv_path} line {line}",
                    column=fmt.image_column)  # fmt: skip
        grades.append(parse_grade(row[fmt.grade_column], where=f"{csv_path} line {line} column {fmt.grade_column!r}"))
    grades_all = np.asarray(grades, dtype=np.int64)
    groups = np.asarray([fmt.patient_of(Path(n).stem) for n in listing.names]) if fmt.patient_of else None
    split = split_by_strata(grades_all, groups=groups, val_fraction=opts.val_fraction or 0.0,
                            test_fraction=opts.test_fraction or 0.0, seed=opts.split_seed)  # fmt: skip
    return LabelledImageSet(
        targets=(grades_all >= 2).astype(np.float32)[:, None],
        split=split,
        label_names=["referable_dr"],
        task="binary",
        augment=opts.augment,
        split_rule=f"seeded split stratified by grade (seed {opts.split_seed}, "
        f"val {opts.val_fraction}, test {opts.test_fraction}){', by patient' if groups is not None else ''}",
        channels=3,
        origin=str(csv_path),
        listing=listing,
        crop="fundus",
        grades=grades_all,
        groups=groups,
        meta={"grade_names": list(GRADE_NAMES)},
    )


def retina_declaration(fmt: RetinaFormat) -> DatasetDeclaration:
    def read_options(given: DeclaredSource) -> RetinaOptions:
        o = given.options
        return RetinaOptions(
            fmt=fmt,
            val_fraction=o.fraction("val_fraction", 0.1),
            test_fraction=o.fraction("test_fraction", 0.2),
            split_seed=o.integer("split_seed", 0),
            image_dir=o.text("image_dir", fmt.image_dir) or "",
            image_ext=o.text("image_ext", fmt.image_ext) or "",
            augment=o.choice("augment", "fundus", AUGMENT_POLICIES),
        )

    return DatasetDeclaration(
        recipe=RECIPE_VERSION,
        options=RETINA_OPTIONS,
        needs=f"a folder or s3:// prefix holding {fmt.csv}",
        read_options=read_options,
        index=lambda given, _: {"index": given.source.fingerprint(fmt.csv)},
        read_rows=read_retina_rows,
    )


for _name, _fmt in RETINA_FORMATS.items():
    retina_declaration(_fmt).register(_name, doc=f"Fundus photos from {_fmt.csv}; target: referable DR (grade >= 2).")
