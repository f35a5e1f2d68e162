"""MedMNIST npz files (Yang et al. 2023): small fixed-split medical benchmarks.

The source is an ``.npz`` with ``train_images, train_labels, val_images, val_labels,
test_images, test_labels`` (uint8 ``N x H x W`` or ``N x H x W x 3``): a file, a folder
holding one, or an ``s3://`` object/prefix. Presets:

- ``retinamnist``: 5 DR grades -> target referable DR (grade >= 2), grades kept;
- ``chestmnist``: 14 binary labels (multi-label).

Otherwise labels ``(N, 1)`` with C classes become a one-hot multiclass task and
``(N, L)`` 0/1 labels a multi-label task. The splits are MedMNIST's own.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.data import imaging
from transfusion.data.build import AUGMENT_POLICIES
from transfusion.data.declared import DatasetDeclaration, DeclaredSource, LabelledImageSet
from transfusion.data.prepared import SPLITS
from transfusion.data.synthetic_retina import GRADE_NAMES

RECIPE_VERSION = "1"
CHESTMNIST_LABELS = (
    "atelectasis",
    "cardiomegaly",
    "effusion",
    "infiltration",
    "mass",
    "nodule",
    "pneumonia",
    "pneumothorax",
    "consolidation",
    "edema",
    "emphysema",
    "fibrosis",
    "pleural",
    "hernia",
)
PRESETS = ("retinamnist", "chestmnist", "generic")
MEDMNIST_OPTIONS = ("preset", "file", "label_names", "augment")
_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")


def _find_npz(source_root: Path, file: str | None, uri: str) -> Path:
    if file:
        path = source_root / file
        if not path.is_file():
            raise ValueError(f"MedMNIST file {file!r} not found in {uri}")
        return path
    found = sorted(source_root.glob("*.npz"))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ValueError(f"{uri} must hold exactly one .npz (found: {listed}); choose one with option file=NAME")
    return found[0]


def _guess_preset(npz_name: str) -> str:
    lowered = npz_name.lower()
    for preset in ("retinamnist", "chestmnist"):
        if lowered.startswith(preset):
            return preset
    return "generic"


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        # np.load reads whatever the bytes say (one .npy array, or a pickle it then refuses
        # with a message naming neither the file nor npz): only a zip is an npz.
        with path.open("rb") as stream:
            if stream.read(4) != b"PK\x03\x04":
                raise ValueError(f"{path}: not an npz file (an npz is a zip archive of .npy arrays)")
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _KEYS if k not in npz.files]
            if missing:
                raise ValueError(f"{path}: missing array {missing[0]!r} (has: {', '.join(npz.files)})")
            try:
                return {k: npz[k] for k in _KEYS}
            except ValueError:  # numpy refuses object arrays without allow_pickle
                raise ValueError(f"{path}: arrays hold Python objects; expected numeric arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable npz file ({exc})") from None


def _first_bad_row(bad: np.ndarray) -> int | None:
    rows = np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))
    return int(rows[0]) if len(rows) else None


def _labels_to_targets(
    labels: np.ndarray, *, preset: str, path: Path, names: list[str] | None, row_name: Callable[[int], str]
) -> tuple[np.ndarray, np.ndarray | None, list[str], str]:
    """(targets, grades or class ids, label names, task) for all splits' labels stacked.

    ``row_name(i)`` names stacked row ``i`` (``test_labels row 3``) for the error messages.
    """
    if labels.ndim == 1:
        labels = labels[:, None]
    row = _first_bad_row(~np.isfinite(labels) | (labels != np.round(labels)))
    if row is not None:
        raise ValueError(f"{path}: {row_name(row)}: labels must be integers, got {labels[row].tolist()}")
    labels = labels.astype(np.int64)
    if preset == "retinamnist":
        if labels.shape[1] != 1:
            raise ValueError(f"{path}: retinamnist labels must have shape (N, 1), got {labels.shape}")
        row = _first_bad_row((labels < 0) | (labels > 4))
        if row is not None:
            raise ValueError(f"{path}: {row_name(row)}: unknown label value {int(labels[row, 0])} (grades are 0-4)")
        grades = labels[:, 0]
        return (grades >= 2).astype(np.float32)[:, None], grades, ["referable_dr"], "binary"
    if preset == "chestmnist" or labels.shape[1] > 1:
        row = _first_bad_row((labels != 0) & (labels != 1))
        if row is not None:
            raise ValueError(
                f"{path}: {row_name(row)}: unknown label values {labels[row].tolist()} in a multi-label set "
                "(expected 0 or 1)"
            )
        expected = len(CHESTMNIST_LABELS) if preset == "chestmnist" else labels.shape[1]
        if labels.shape[1] != expected:
            raise ValueError(f"{path}: {preset} labels must have {expected} columns, got {labels.shape[1]}")
        default = list(CHESTMNIST_LABELS) if preset == "chestmnist" else [f"label_{j}" for j in range(expected)]
        label_names = names or default
        if len(label_names) != expected:
            raise ValueError(f"option label_names has {len(label_names)} names for {expected} labels in {path}")
        return labels.astype(np.float32), None, label_names, "binary"
    row = _first_bad_row(labels < 0)
    if row is not None:
        raise ValueError(f"{path}: {row_name(row)}: unknown label value {int(labels[row, 0])} (class ids must be >= 0)")
    classes = int(labels.max()) + 1
    label_names = names or [f"class_{c}" for c in range(classes)]
    if len(label_names) != classes:
        raise ValueError(f"option label_names has {len(label_names)} names for {classes} classes in {path}")
    return np.eye(classes, dtype=np.float32)[labels[:, 0]], labels[:, 0], label_names, "multiclass"


def _refuse_duplicate_images(images_by_split: list[np.ndarray], *, path: Path, row_name: Callable[[int], str]) -> None:
    """The same image twice (an npz has no ids: its pixels are its id) may sit in train and test."""
    first: dict[bytes, int] = {}
    index = 0
    for images in images_by_split:
        for image in images:
            digest = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
            seen = first.setdefault(digest, index)
            if seen != index:
                raise ValueError(f"{path}: {row_name(index)} is the same image as {row_name(seen)}")
            index += 1


@dataclass(frozen=True)
class MedmnistOptions:
    npz_path: Path
    preset: str
    augment: str
    label_names: list[str] | None


def read_medmnist_options(given: DeclaredSource) -> MedmnistOptions:
    """The npz and its preset come first: the preset's default is guessed from the file name."""
    o, source = given.options, given.source
    npz_path = _find_npz(source.root, source.file or o.text("file", None), source.uri)
    preset = o.choice("preset", _guess_preset(npz_path.name), PRESETS)
    default_augment = {"retinamnist": "fundus", "chestmnist": "xray"}.get(preset, "none")
    augment = o.choice("augment", default_augment, AUGMENT_POLICIES)
    return MedmnistOptions(npz_path, preset, augment, o.names("label_names", None))


def _split_arrays(npz_path: Path) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Images and (N, L) labels of train, val, test, checked; and their channel count."""
    arrays = _load_arrays(npz_path)
    images_by_split, labels_by_split = [], []
    channels: int | None = None
    for split_name in ("train", "val", "test"):
        images, labels = arrays[f"{split_name}_images"], arrays[f"{split_name}_labels"]
        if len(images) == 0:
            raise ValueError(f"{npz_path}: the {split_name} split is empty ({split_name}_images has no rows)")
        if len(labels) != len(images):
            raise ValueError(f"{npz_path}: {split_name}_labels has {len(labels)} rows for {len(images)} images")
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(
                f"{npz_path}: {split_name}_images must be uint8 N x H x W or N x H x W x 3, "
                f"got {images.dtype} {images.shape}"
            )
        split_channels = 1 if images.ndim == 3 else 3
        if channels is not None and split_channels != channels:
            raise ValueError(f"{npz_path}: {split_name}_images has {split_channels} channels, other splits {channels}")
        channels = split_channels
        images_by_split.append(images)
        labels_by_split.append(labels.reshape(len(labels), -1) if labels.ndim > 1 else labels[:, None])
    return images_by_split, labels_by_split, channels


def read_medmnist_rows(given: DeclaredSource, opts: MedmnistOptions) -> LabelledImageSet:
    """MedMNIST's own splits; the pixels are each image's id for the duplicate check."""
    npz_path, resolution = opts.npz_path, given.resolution
    images_by_split, labels_by_split, channels = _split_arrays(npz_path)
    # Index the per-split arrays in place: concatenating would hold every image twice.
    offsets = np.cumsum([0] + [len(images) for images in images_by_split])

    def row_name(i: int, kind: str = "labels") -> str:
        part = int(np.searchsorted(offsets, i, side="right")) - 1
        return f"{('train', 'val', 'test')[part]}_{kind} row {i - offsets[part]}"

    targets, grades, label_names, task = _labels_to_targets(
        np.concatenate(labels_by_split), preset=opts.preset, path=npz_path, names=opts.label_names, row_name=row_name
    )
    _refuse_duplicate_images(images_by_split, path=npz_path, row_name=lambda i: row_name(i, "images"))

    def load(i: int) -> np.ndarray:
        part = int(np.searchsorted(offsets, i, side="right")) - 1
        pixels = images_by_split[part][i - offsets[part]]
        if pixels.shape[:2] == (resolution, resolution):
            return pixels[..., None] if pixels.ndim == 2 else pixels
        return imaging.fit_array(pixels, resolution=resolution, channels=channels)

    codes = [np.full(len(im), code, dtype=np.int8) for im, code in zip(images_by_split, SPLITS.values(), strict=True)]
    return LabelledImageSet(
        targets=targets,
        split=np.concatenate(codes),
        label_names=label_names,
        task=task,
        augment=opts.augment,
        split_rule="MedMNIST's own train/val/test",
        channels=channels,
        origin=str(npz_path),
        names=[f"{npz_path.name}[{i}]" for i in range(int(offsets[-1]))],
        load=load,
        grades=grades,
        meta={"preset": opts.preset, **({"grade_names": list(GRADE_NAMES)} if opts.preset == "retinamnist" else {})},
    )


MEDMNIST = DatasetDeclaration(
    recipe=RECIPE_VERSION,
    options=MEDMNIST_OPTIONS,
    needs="an .npz file, a folder with one, or an s3:// URI",
    read_options=read_medmnist_options,
    index=lambda given, opts: {"index": given.source.fingerprint(opts.npz_path.name), "preset": opts.preset},
    read_rows=read_medmnist_rows,
    accepts_file=True,
    decodes_files=False,
)
MEDMNIST.register("medmnist", doc="A MedMNIST-format npz with its own train/val/test splits.")
