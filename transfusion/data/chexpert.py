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

import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from transfusion.data.build import label_strata, read_csv, split_by_strata
from transfusion.data.declared import DatasetDeclaration, DeclaredSource, ImageListing, LabelledImageSet
from transfusion.data.prepared import SPLITS

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
    csv_path: Path, listing: ImageListing, *, labels: list[str], uncertain: float, frontal_only: bool
) -> tuple[np.ndarray, list[str], int]:
    """Rows of one CheXpert CSV into ``listing``: their targets, patients, lateral views dropped."""
    required = ["Path", *labels] + (["Frontal/Lateral"] if frontal_only else [])
    rows = read_csv(csv_path, required=required)
    drop = _path_base(listing.root, rows[0][1]["Path"])
    targets, patients = [], []
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
        listing.add("/".join(parts[drop:]) if len(parts) > drop else path, where=where, column="Path")
        patients.append(patient_of(path, where=f"{where} column 'Path'"))
        targets.append([parse_observation(row[c], uncertain=uncertain, where=f"{where} column {c!r}") for c in labels])
    return np.asarray(targets, dtype=np.float32).reshape(len(patients), len(labels)), patients, lateral


@dataclass(frozen=True)
class ChexpertOptions:
    policy: str
    frontal_only: bool
    labels: list[str]
    val_fraction: float
    test_fraction: float | None
    split_seed: int
    augment: str
    # valid.csv is the test split unless the caller asks for a test split cut from train.csv.
    use_valid: bool


def read_chexpert_options(given: DeclaredSource) -> ChexpertOptions:
    o = given.options
    policy = o.choice("uncertainty", "u-ones", UNCERTAINTY_POLICIES)
    frontal_only = o.boolean("frontal_only", True)
    labels = o.names("labels", PAPER_PATHOLOGIES) or list(PAPER_PATHOLOGIES)
    unknown = [label for label in labels if label not in OBSERVATIONS]
    if unknown:
        raise ValueError(f"option labels: unknown observation {unknown[0]!r}; valid: {', '.join(OBSERVATIONS)}")
    val_fraction = o.fraction("val_fraction", 0.05) or 0.0
    test_fraction = o.fraction("test_fraction", None)
    split_seed = o.integer("split_seed", 0)
    augment = o.choice("augment", "xray", ("xray", "natural", "none"))
    use_valid = test_fraction is None and (given.source.root / "valid.csv").is_file()
    return ChexpertOptions(policy, frontal_only, labels, val_fraction, test_fraction, split_seed, augment, use_valid)


def chexpert_index(given: DeclaredSource, opts: ChexpertOptions) -> dict[str, object]:
    files = ["train.csv"] + (["valid.csv"] if opts.use_valid else [])
    return {"index": {f: given.source.fingerprint(f) for f in files}, "use_valid": opts.use_valid}


def read_chexpert_rows(given: DeclaredSource, opts: ChexpertOptions) -> LabelledImageSet:
    """train.csv (train/val by patient) and valid.csv (test); patients never span two splits."""
    root = given.source.root
    # One listing for both index files: an image in train.csv and valid.csv is in train and test.
    listing = ImageListing(root)
    read = dict(labels=opts.labels, uncertain=UNCERTAINTY_POLICIES[opts.policy], frontal_only=opts.frontal_only)
    targets, patients, lateral = _read_index(root / "train.csv", listing, **read)
    if not patients:
        raise ValueError(f"{root / 'train.csv'}: no images left after frontal_only={opts.frontal_only}")
    test_fraction = 0.0 if opts.use_valid else (opts.test_fraction if opts.test_fraction is not None else 0.1)
    split = split_by_strata(label_strata(targets), groups=np.asarray(patients), val_fraction=opts.val_fraction,
                            test_fraction=test_fraction, seed=opts.split_seed)  # fmt: skip
    origin = str(root / "train.csv")
    seeded = f"seeded patient split of train.csv (seed {opts.split_seed}, val {opts.val_fraction}"
    rule = f"{seeded}, test {opts.test_fraction})"
    if opts.use_valid:
        valid_csv = root / "valid.csv"
        t_targets, t_patients, t_lateral = _read_index(valid_csv, listing, **read)
        shared = sorted(set(t_patients) & set(patients))
        if shared:
            raise ValueError(
                f"{valid_csv}: patient {shared[0]} is also in train.csv ({len(shared)} shared patients); "
                "splits must be patient-separated (set test_fraction to split train.csv instead)"
            )
        patients += t_patients
        targets = np.concatenate([targets, t_targets]) if len(t_targets) else targets
        split = np.concatenate([split, np.full(len(t_patients), SPLITS["test"], dtype=np.int8)])
        lateral += t_lateral
        origin += f" and {valid_csv}"
        rule = f"test: valid.csv; train/val: {seeded})"
    return LabelledImageSet(
        targets=targets,
        split=split,
        label_names=list(opts.labels),
        task="binary",
        augment=opts.augment,
        split_rule=rule,
        channels=1,
        origin=origin,
        listing=listing,
        groups=np.asarray(patients),
        meta={"uncertainty": opts.policy, "frontal_only": opts.frontal_only, "lateral_left_out": lateral},
    )


CHEXPERT = DatasetDeclaration(
    recipe=RECIPE_VERSION,
    options=CHEXPERT_OPTIONS,
    needs="the folder or s3:// prefix holding train.csv",
    read_options=read_chexpert_options,
    index=chexpert_index,
    read_rows=read_chexpert_rows,
)
CHEXPERT.register("chexpert", doc="CheXpert: five pathologies (multi-label), patient-separated splits, 224 px grey.")
