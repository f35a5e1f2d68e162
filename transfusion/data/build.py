"""Builds a prepared dataset from labelled images: the parts the dataset template uses.

The template (:mod:`transfusion.data.declared`) reads a dataset's index into a
:class:`LabelledImages` table and calls :func:`write_prepared`, which decodes every
image (threads: PIL releases the GIL while decoding and resizing), collects *all* bad
files before failing, and writes through :class:`PreparedDatasetWriter` so nothing
half-written is left behind. The version key hashes the source identity, index
fingerprints, options and resolution: preparing again with the same inputs finds the
prepared set and decodes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from transfusion.data import RUNTIME_OPTIONS, PrepareRequest
from transfusion.data.imaging import ImageDecodeError
from transfusion.data.prepared import (
    SPLITS,
    PreparedDataset,
    PreparedDatasetWriter,
    stratified_order,
)
from transfusion.data.summary import label_summary

log = logging.getLogger(__name__)

# Resolution used when the caller names none: the paper's 587 px for fundus photos and
# 224 px for chest X-rays; MedMNIST at its native 28 px.
DEFAULT_RESOLUTIONS: dict[str, int] = {
    "retina-eyepacs": 587,
    "retina-aptos": 587,
    "chexpert": 224,
    "medmnist": 28,
    "synthetic-chest": 224,
    "folder": 224,
}
AUGMENT_POLICIES = ("fundus", "xray", "natural", "none")
SPLIT_CODES = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def default_resolution(name: str) -> int:
    """The resolution a dataset is prepared at when the caller gives none."""
    if name not in DEFAULT_RESOLUTIONS:
        raise ValueError(f"dataset {name!r} has no default resolution; pass one (e.g. --resolution 224)")
    return DEFAULT_RESOLUTIONS[name]


def home_of(data_root: Path) -> Path:
    """``$TRANSFUSION_HOME`` from a preparer's ``<home>/data/<name>`` (for the source cache)."""
    return data_root.parent.parent


class DatasetOptions:
    """Typed reads of a request's options; unknown option names are rejected.

    Values may be typed (from a YAML grid) or strings (from ``--option key=value``); the
    version key is built from the parsed values, so ``0.1`` and ``"0.1"`` prepare once.
    """

    def __init__(self, request: PrepareRequest, valid: Iterable[str]) -> None:
        self.dataset = request.name
        self.values = dict(request.options)
        self.valid = sorted(set(valid))
        self.parsed: dict[str, object] = {}
        unknown = sorted(set(self.values) - set(self.valid))
        if unknown:
            raise ValueError(
                f"unknown option {unknown[0]!r} for dataset {self.dataset!r}; valid: {', '.join(self.valid)}"
            )

    def _bad(self, key: str, value: object, expected: str) -> ValueError:
        return ValueError(f"option {key}={value!r} of dataset {self.dataset!r}: expected {expected}")

    def _keep(self, key: str, value):
        self.parsed[key] = value
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return self._keep(key, value if isinstance(value, bool) else text in ("1", "true", "yes", "on"))
        raise self._bad(key, value, "true or false")

    def integer(self, key: str, default: int, *, low: int | None = None) -> int:
        value = self.values.get(key, default)
        try:
            number = value if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            raise self._bad(key, value, "an integer") from None
        if low is not None and number < low:
            raise self._bad(key, value, f"an integer >= {low}")
        return self._keep(key, number)

    def fraction(self, key: str, default: float | None) -> float | None:
        value = self.values.get(key, default)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return self._keep(key, None)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self._bad(key, value, "a number in [0, 1)") from None
        if not 0.0 <= number < 1.0:
            raise self._bad(key, value, "a number in [0, 1)")
        return self._keep(key, number)

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        value = str(self.values.get(key, default)).strip().lower()
        choices = list(choices)
        if value not in choices:
            raise self._bad(key, self.values.get(key, default), f"one of {', '.join(choices)}")
        return self._keep(key, value)

    def text(self, key: str, default: str | None) -> str | None:
        value = self.values.get(key, default)
        return self._keep(key, None if value is None else str(value))

    def names(self, key: str, default: Iterable[str] | None) -> list[str] | None:
        value = self.values.get(key, default)
        if value is None:
            return self._keep(key, None)
        items = value.split(",") if isinstance(value, str) else list(value)
        names = [str(item).strip() for item in items if str(item).strip()]
        if not names:
            raise self._bad(key, value, "a non-empty list of names")
        return self._keep(key, names)

    def key_part(self) -> dict[str, object]:
        """The parsed options (defaults included) that define the prepared content."""
        return {k: v for k, v in sorted(self.parsed.items()) if k not in RUNTIME_OPTIONS}


def version_key(*, resolution: int, parts: dict) -> str:
    """``r<res>-<hash>`` of everything that defines a prepared dataset's content."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return f"r{resolution}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def member_path(root: Path, value: str, *, where: str) -> Path:
    """The file ``value`` names inside ``root``; paths leaving the root are refused.

    Args:
        root: the dataset root.
        value: a relative path from an index file (POSIX or Windows separators).
        where: the index file, line and column, for the error message.
    """
    text = str(value).strip().replace("\\", "/")
    if not text:
        raise ValueError(f"{where}: empty image path")
    parts = PurePosixPath(text).parts
    if text.startswith(("/", "~")) or _WINDOWS_DRIVE.match(text) or ".." in parts:
        raise ValueError(f"{where}: image path {value!r} escapes the dataset root {root}")
    return inside_root(root, root.joinpath(*parts), where=where)


def inside_root(root: Path, path: Path, *, where: str) -> Path:
    """``path`` if it resolves inside ``root``: a symlinked file or folder pointing out is refused.

    The path text alone cannot tell (``images/a.png`` may be a link to ``/etc``); the
    resolved path can.
    """
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        shown = str(path.relative_to(root))
        raise ValueError(f"{where}: image path {shown!r} resolves outside the dataset root {root} (a symlink?)")
    return resolved


class FirstListing:
    """Where each image was first listed; a second listing is refused, naming both rows.

    The same image twice can carry conflicting labels and land in train and test.
    """

    def __init__(self) -> None:
        self._where: dict[object, str] = {}

    def add(self, key: object, *, name: str, where: str) -> None:
        first = self._where.setdefault(key, where)
        if first is not where:
            raise ValueError(f"{where}: image {name!r} is listed twice (first at {first})")


def read_csv(path: Path, *, required: Iterable[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV as ``(line number, row)``; every ``required`` column must exist."""
    if not path.is_file():
        raise ValueError(f"index file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        reader.fieldnames = header
        for column in required:
            if column not in header:
                raise ValueError(f"{path}: missing column {column!r} (columns: {', '.join(header) or 'none'})")
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def parse_grade(value: str, *, where: str, grades: int = 5) -> int:
    """A DR grade 0..grades-1 from text like ``2`` or ``2.0``."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number.is_integer() and 0 <= number < grades):
        raise ValueError(f"{where}: unknown grade {value!r} (expected an integer 0-{grades - 1})")
    return int(number)


def label_strata(targets: np.ndarray) -> np.ndarray:
    """Label-powerset key of the first 8 labels (NaN = negative), as in ``stratum()``."""
    bits = np.nan_to_num(targets, nan=0.0) > 0.5
    width = min(8, bits.shape[1])
    return (bits[:, :width] * (1 << np.arange(width))).sum(axis=1)


def split_by_strata(
    strata: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """Seeded, stratified train/val/test codes; a group (patient) never spans two splits.

    Groups are ordered by :func:`stratified_order` on their largest stratum value and
    dealt out in that order: the first ``test_fraction`` of the images to test, the next
    ``val_fraction`` to validation, the rest to training.
    """
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    n = len(strata)
    if groups is None:
        unit_of, unit_strata = np.arange(n), np.asarray(strata)
    else:
        _, unit_of = np.unique(np.asarray(groups), return_inverse=True)
        unit_strata = np.zeros(unit_of.max() + 1, dtype=np.int64)
        np.maximum.at(unit_strata, unit_of, np.asarray(strata, dtype=np.int64))
    sizes = np.bincount(unit_of, minlength=len(unit_strata))
    order = stratified_order(unit_strata, seed=seed)

    def share(fraction: float) -> int:
        return max(1, round(fraction * n)) if fraction > 0 else 0

    n_test, n_val = share(test_fraction), share(val_fraction)
    before = np.cumsum(sizes[order]) - sizes[order]  # images dealt out before each unit
    unit_split = np.zeros(len(unit_strata), dtype=np.int8)
    unit_split[order[before < n_test + n_val]] = SPLITS["val"]
    unit_split[order[before < n_test]] = SPLITS["test"]
    return unit_split[unit_of]


def check_splits(split: np.ndarray, *, name: str, origin: str) -> None:
    """Raises naming the first empty split (before any decoding starts)."""
    for split_name, code in SPLITS.items():
        if not np.any(split == code):
            raise ValueError(
                f"dataset {name!r}: the {split_name} split is empty "
                f"({len(split)} images from {origin}); "
                "check the split fractions/columns or add data"
            )


@dataclass
class LabelledImages:
    """What a preparer read from its index: one row per image.

    ``names`` are the paths as the index writes them (for reports); ``load(i)`` returns
    image ``i`` as uint8 ``(H, W, C)`` or raises :class:`ImageDecodeError`.
    """

    names: list[str]
    load: Callable[[int], np.ndarray]
    targets: np.ndarray
    split: np.ndarray
    grades: np.ndarray | None = None
    groups: np.ndarray | None = None


def bad_files_error(name: str, bad: list[dict[str, str]]) -> ValueError:
    """One ValueError listing every bad file: count and first file on the first line."""
    first = bad[0]
    lines = [
        f"{len(bad)} bad image file{'s' if len(bad) != 1 else ''} in dataset {name!r}; first: "
        f"{first['path']} ({first['reason']}); "
        "pass skip_bad=True (CLI: --skip-bad) to leave them out"
    ]
    lines += [f"  {item['path']}: {item['reason']}" for item in bad]
    return ValueError("\n".join(lines))


def open_if_prepared(root: Path, *, skip_bad: bool) -> PreparedDataset | None:
    """The prepared dataset at ``root`` if there is one (no decoding), else None.

    A set prepared with ``skip_bad`` that left files out still fails without
    ``skip_bad``, so the outcome never depends on what the cache happens to hold.
    """
    if not (root / "meta.json").is_file():
        return None
    dataset = PreparedDataset.open(root)
    if dataset.meta.get("skipped") and not skip_bad:
        raise bad_files_error(dataset.name, dataset.meta.get("skipped_files", []))
    log.info("dataset %s %s already prepared at %s", dataset.name, root.name, root)
    return dataset


def _decode_all(table: LabelledImages, writer: PreparedDatasetWriter, *, workers: int, name: str) -> dict[int, str]:
    """Decodes every image into the writer; returns ``{index: reason}`` of the failures."""
    failures: dict[int, str] = {}
    total = len(table.names)
    started = last_report = time.perf_counter()

    def collect(i: int, future: Future) -> None:
        try:
            writer.images[i] = future.result()
        except ImageDecodeError as exc:
            failures[i] = exc.reason

    # A bounded window of in-flight decodes keeps memory flat for large datasets.
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        pending: deque[tuple[int, Future]] = deque()
        for i in range(total):
            pending.append((i, pool.submit(table.load, i)))
            if len(pending) >= 8 * max(1, workers):
                collect(*pending.popleft())
            now = time.perf_counter()
            if now - last_report > 30:
                log.info("%s: decoded %d/%d images (%.0f/s)", name, i, total, i / (now - started))
                last_report = now
        while pending:
            collect(*pending.popleft())
    log.info("%s: decoded %d images in %.1f s", name, total, time.perf_counter() - started)
    return failures


def write_prepared(
    root: Path,
    table: LabelledImages,
    *,
    meta: dict,
    resolution: int,
    channels: int,
    skip_bad: bool,
    workers: int,
) -> PreparedDataset:
    """Decodes ``table`` and writes it as a prepared dataset at ``root``.

    Bad files (missing, corrupt, truncated) are all collected; without ``skip_bad`` the
    preparation then fails listing them, else they are left out and recorded in
    ``meta["skipped_files"]``. Nothing is left behind on failure.
    """
    name = meta["name"]
    total = len(table.names)
    with PreparedDatasetWriter(root, num_images=total, image_shape=(resolution, resolution, channels)) as writer:
        failures = _decode_all(table, writer, workers=workers, name=name)
        bad = [{"path": table.names[i], "reason": reason} for i, reason in sorted(failures.items())]
        if bad and not skip_bad:
            raise bad_files_error(name, bad)
        keep = np.setdiff1d(np.arange(total), np.fromiter(failures, dtype=np.int64, count=len(failures)))
        if bad:
            log.warning("%s: skipping %d bad image files (first: %s)", name, len(bad), bad[0]["path"])
            writer.keep(keep)
        targets, split = table.targets[keep], table.split[keep]
        label_names = meta["label_names"]
        meta = {
            **meta,
            "channels": channels,
            "summary": label_summary(targets, split, label_names),
            "skipped": len(bad),
            "skipped_files": bad,
        }
        return writer.finish(
            meta=meta,
            targets=targets,
            split=split,
            grades=None if table.grades is None else table.grades[keep],
            groups=None if table.groups is None else table.groups[keep],
        )
