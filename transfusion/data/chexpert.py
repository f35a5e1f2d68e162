"""CheXpert chest radiographs (Irvin et al. 2019): the paper's five-pathology task.

Source: the folder holding ``train.csv`` (and usually ``valid.csv``), e.g. the unpacked
``CheXpert-v1.0-small``. Paths in the CSVs start with that folder's name
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``, relative to its
parent); root-relative paths work too. Observations are 1.0 (positive), 0.0 (negative),
-1.0 (uncertain) or blank (unmentioned, read as negative); the ``uncertainty`` option maps
uncertain labels: ``u-ones`` -> 1, ``u-zeros`` -> 0, ``u-ignore`` -> NaN (left out of the
loss and of AUC). Splits are by patient: ``valid.csv`` is the test split (its patients
are not in ``train.csv``), and train/validation are a seeded patient split of
``train.csv``. Images are greyscale, centre-cropped and resized (224 px by default).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path, PurePosixPath

import numpy as np

from transfusion.data import DATASETS, PrepareRequest, imaging
from transfusion.data.build import (
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
from transfusion.data.prepared import SPLITS, PreparedDataset
from transfusion.data.sources import open_source

log = logging.getLogger(__name__)

RECIPE_VERSION = "1"
PAPER_PATHOLOGIES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
UNCERTAINTY_POLICIES = {"u-ones": 1.0, "u-zeros": 0.0, "u-ignore": math.nan}
CHEXPERT_OPTIONS = (
    "uncertainty",
    "frontal_only",
    "labels",
    "val_fraction",
    "test_fraction",
    "split_seed",
    "augment",
    "skip_bad",
    "workers",
)
_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")
_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": 0.0}


def parse_observation(value: str, *, uncertain: float, where: str) -> float:
    """1 / 0 / -1 (uncertain, mapped by the policy) / blank (unmentioned: negative)."""
    if value not in _VALUES:
        raise ValueError(f"{where}: unknown label value {value!r} (expected 1.0, 0.0, -1.0 or blank)")
    number = _VALUES[value]
    return uncertain if number == -1.0 else number


def patient_of(path: str, *, where: str) -> str:
    match = _PATIENT.search(path)
    if not match:
        raise ValueError(f"{where}: cannot find a patient id (patientNNNNN) in path {path!r}")
    return match.group(1)


def _path_base(root: Path, first_path: str) -> int:
    """How many leading components of the CSV paths to drop to be root-relative.

    The release writes paths relative to the parent of the data folder; whether the
    first component must go is decided once, from the first row, so a missing file is
    reported as missing instead of silently changing the rule.
    """
    parts = PurePosixPath(first_path.replace("\\", "/")).parts
    if len(parts) > 1 and (root / parts[0]).is_dir():
        return 0
    if len(parts) > 1 and ((root / Path(*parts[1:])).exists() or parts[0].lower().startswith("chexpert")):
        return 1
    return 0


def _read_index(
    csv_path: Path,
    root: Path,
    *,
    labels: list[str],
    uncertain: float,
    frontal_only: bool,
    listed: FirstListing,
) -> tuple[list[str], list[Path], np.ndarray, list[str], int]:
    """Rows of one CheXpert CSV: names, files, targets, patients, lateral views dropped."""
    required = ["Path", *labels] + (["Frontal/Lateral"] if frontal_only else [])
    rows = read_csv(csv_path, required=required)
    drop = _path_base(root, rows[0][1]["Path"])
    names, files, targets, patients = [], [], [], []
    lateral = 0
    for line, row in rows:
        where = f"{csv_path} line {line}"
        if frontal_only:
            view = row["Frontal/Lateral"]
            if view not in ("Frontal", "Lateral"):
                raise ValueError(
                    f"{where} column 'Frontal/Lateral': unknown value {view!r} (expected Frontal or Lateral)"
                )
            if view == "Lateral":
                lateral += 1
                continue
        path = row["Path"].replace("\\", "/")
        parts = PurePosixPath(path).parts
        relative = "/".join(parts[drop:]) if len(parts) > drop else path
        files.append(member_path(root, relative, where=f"{where} column 'Path'"))
        listed.add(files[-1], name=relative, where=where)
        names.append(relative)
        patients.append(patient_of(path, where=f"{where} column 'Path'"))
        targets.append([parse_observation(row[c], uncertain=uncertain, where=f"{where} column {c!r}") for c in labels])
    target_array = np.asarray(targets, dtype=np.float32).reshape(len(names), len(labels))
    return names, files, target_array, patients, lateral


@DATASETS.register("chexpert")
def prepare_chexpert(request: PrepareRequest, data_root: Path) -> PreparedDataset:
    """CheXpert: five pathologies (multi-label), patient-separated splits, 224 px greyscale."""
    options = DatasetOptions(request, CHEXPERT_OPTIONS)
    policy = options.choice("uncertainty", "u-ones", UNCERTAINTY_POLICIES)
    frontal_only = options.boolean("frontal_only", True)
    labels = options.names("labels", PAPER_PATHOLOGIES) or list(PAPER_PATHOLOGIES)
    unknown = [label for label in labels if label not in OBSERVATIONS]
    if unknown:
        raise ValueError(f"option labels: unknown observation {unknown[0]!r}; valid: {', '.join(OBSERVATIONS)}")
    val_fraction = options.fraction("val_fraction", 0.05) or 0.0
    test_fraction = options.fraction("test_fraction", None)
    split_seed = options.integer("split_seed", 0)
    augment = options.choice("augment", "xray", ("xray", "natural", "none"))
    skip_bad = options.boolean("skip_bad", False)
    workers = options.integer("workers", 2, low=1)
    if not request.source:
        raise ValueError("dataset 'chexpert' needs a source: the folder or s3:// prefix holding train.csv")
    source = open_source(request.source, home=home_of(data_root))
    if source.file is not None:
        raise ValueError(f"dataset 'chexpert' needs the folder holding train.csv, got the file {request.source}")
    # valid.csv is the test split unless the caller asks for a test split cut from train.csv.
    use_valid = test_fraction is None and (source.root / "valid.csv").is_file()
    index_files = ["train.csv"] + (["valid.csv"] if use_valid else [])
    key = version_key(
        resolution=request.resolution,
        parts={
            "recipe": RECIPE_VERSION,
            "source": source.identity,
            "index": {f: source.fingerprint(f) for f in index_files},
            "options": options.key_part(),
            "use_valid": use_valid,
        },
    )
    root = data_root / key
    found = open_if_prepared(root, skip_bad=skip_bad)
    if found is not None:
        return found

    uncertain = UNCERTAINTY_POLICIES[policy]
    # One listing for both index files: an image in train.csv and valid.csv is in train and test.
    read = dict(root=source.root, labels=labels, uncertain=uncertain, frontal_only=frontal_only, listed=FirstListing())
    names, files, targets, patients, lateral = _read_index(source.root / "train.csv", **read)
    if not names:
        raise ValueError(f"{source.root / 'train.csv'}: no images left after frontal_only={frontal_only}")
    patients_array = np.asarray(patients)
    split = split_by_strata(
        label_strata(targets),
        groups=patients_array,
        val_fraction=val_fraction,
        test_fraction=0.0 if use_valid else (test_fraction if test_fraction is not None else 0.1),
        seed=split_seed,
    )
    origin = str(source.root / "train.csv")
    if use_valid:
        valid_csv = source.root / "valid.csv"
        t_names, t_files, t_targets, t_patients, t_lateral = _read_index(valid_csv, **read)
        shared = sorted(set(t_patients) & set(patients))
        if shared:
            raise ValueError(
                f"{valid_csv}: patient {shared[0]} is also in train.csv "
                f"({len(shared)} shared patients); "
                "splits must be patient-separated (set test_fraction to split train.csv instead)"
            )
        names, files, patients_array = (
            names + t_names,
            files + t_files,
            np.concatenate([patients_array, t_patients]),
        )
        targets = np.concatenate([targets, t_targets]) if len(t_targets) else targets
        split = np.concatenate([split, np.full(len(t_names), SPLITS["test"], dtype=np.int8)])
        lateral += t_lateral
        origin += f" and {valid_csv}"
    check_splits(split, name=request.name, origin=origin)
    resolution = request.resolution

    def load(i: int) -> np.ndarray:
        return imaging.load_image(files[i], resolution=resolution, channels=1, crop="center")

    table = LabelledImages(names=names, load=load, targets=targets, split=split, groups=patients_array)
    log.info("preparing chexpert %s: %d images (%d lateral left out)", key, len(names), lateral)
    return write_prepared(
        root,
        table,
        meta={
            "name": request.name,
            "version": key,
            "resolution": resolution,
            "label_names": list(labels),
            "task": "binary",
            "augment": augment,
            "uncertainty": policy,
            "frontal_only": frontal_only,
            "lateral_left_out": lateral,
            "source": source.uri,
            "source_identity": source.identity,
            "options": options.key_part(),
            "split_rule": (
                f"test: valid.csv; train/val: seeded patient split of train.csv (seed {split_seed}, val {val_fraction})"
                if use_valid
                else f"seeded patient split of train.csv (seed {split_seed}, val {val_fraction}, test {test_fraction})"
            ),
        },
        resolution=resolution,
        channels=1,
        skip_bad=skip_bad,
        workers=workers,
    )
