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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.data import DATASETS, PrepareRequest, imaging
from transfusion.data.build import (
    AUGMENT_POLICIES,
    DatasetOptions,
    LabelledImages,
    check_splits,
    home_of,
    member_path,
    open_if_prepared,
    parse_grade,
    read_csv,
    split_by_strata,
    version_key,
    write_prepared,
)
from transfusion.data.prepared import PreparedDataset
from transfusion.data.sources import open_source
from transfusion.data.synthetic_retina import GRADE_NAMES

log = logging.getLogger(__name__)

RECIPE_VERSION = "1"
RETINA_OPTIONS = (
    "val_fraction",
    "test_fraction",
    "split_seed",
    "image_dir",
    "image_ext",
    "augment",
    "skip_bad",
    "workers",
)


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


def _prepare_retina(request: PrepareRequest, data_root: Path, fmt: RetinaFormat) -> PreparedDataset:
    options = DatasetOptions(request, RETINA_OPTIONS)
    val_fraction = options.fraction("val_fraction", 0.1)
    test_fraction = options.fraction("test_fraction", 0.2)
    split_seed = options.integer("split_seed", 0)
    image_dir = options.text("image_dir", fmt.image_dir) or ""
    image_ext = options.text("image_ext", fmt.image_ext) or ""
    augment = options.choice("augment", "fundus", AUGMENT_POLICIES)
    skip_bad = options.boolean("skip_bad", False)
    workers = options.integer("workers", 2, low=1)
    if not request.source:
        raise ValueError(f"dataset {request.name!r} needs a source: a folder or s3:// prefix holding {fmt.csv}")
    source = open_source(request.source, home=home_of(data_root))
    if source.file is not None:
        raise ValueError(f"dataset {request.name!r} needs a folder holding {fmt.csv}, got the file {request.source}")
    key = version_key(
        resolution=request.resolution,
        parts={
            "recipe": RECIPE_VERSION,
            "source": source.identity,
            "index": source.fingerprint(fmt.csv),
            "options": options.key_part(),
        },
    )
    root = data_root / key
    found = open_if_prepared(root, skip_bad=skip_bad)
    if found is not None:
        return found

    csv_path = source.root / fmt.csv
    rows = read_csv(csv_path, required=(fmt.image_column, fmt.grade_column))
    names, files, grades, seen = [], [], [], {}
    for line, row in rows:
        image_id = row[fmt.image_column]
        where = f"{csv_path} line {line} column {fmt.image_column!r}"
        if image_id in seen:
            raise ValueError(f"{where}: image {image_id!r} is listed twice (first on line {seen[image_id]})")
        seen[image_id] = line
        relative = f"{image_dir}/{image_id}{image_ext}" if image_dir else f"{image_id}{image_ext}"
        files.append(member_path(source.root, relative, where=where))
        names.append(relative)
        grades.append(parse_grade(row[fmt.grade_column], where=f"{csv_path} line {line} column {fmt.grade_column!r}"))
    grades_all = np.asarray(grades, dtype=np.int64)
    groups = np.asarray([fmt.patient_of(Path(n).stem) for n in names]) if fmt.patient_of else None
    split = split_by_strata(
        grades_all,
        groups=groups,
        val_fraction=val_fraction or 0.0,
        test_fraction=test_fraction or 0.0,
        seed=split_seed,
    )
    check_splits(split, name=request.name, origin=str(csv_path))
    resolution = request.resolution

    def load(i: int) -> np.ndarray:
        return imaging.load_image(files[i], resolution=resolution, channels=3, crop="fundus")

    table = LabelledImages(
        names=names,
        load=load,
        targets=(grades_all >= 2).astype(np.float32)[:, None],
        split=split,
        grades=grades_all,
        groups=groups,
    )
    log.info("preparing %s %s: %d images from %s", request.name, key, len(names), source.uri)
    return write_prepared(
        root,
        table,
        meta={
            "name": request.name,
            "version": key,
            "resolution": resolution,
            "label_names": ["referable_dr"],
            "task": "binary",
            "augment": augment,
            "grade_names": list(GRADE_NAMES),
            "source": source.uri,
            "source_identity": source.identity,
            "options": options.key_part(),
            "split_rule": f"seeded split stratified by grade (seed {split_seed}, "
            f"val {val_fraction}, test {test_fraction})"
            f"{', by patient' if groups is not None else ''}",
        },
        resolution=resolution,
        channels=3,
        skip_bad=skip_bad,
        workers=workers,
    )


def _register(name: str, fmt: RetinaFormat) -> None:
    def prepare(request: PrepareRequest, data_root: Path) -> PreparedDataset:
        return _prepare_retina(request, data_root, fmt)

    prepare.__doc__ = f"Fundus photos from {fmt.csv}; target: referable DR (grade >= 2)."
    DATASETS.register(name)(prepare)


for _name, _fmt in RETINA_FORMATS.items():
    _register(_name, _fmt)
