"""The read-optimised on-disk form every dataset is prepared into once.

A prepared dataset is a directory holding

- ``meta.json``: name, version, resolution, label names, task kind, counts per split;
- ``images.npy``: uint8 ``(N, H, W, C)``, read through a memory map;
- ``targets.npy``: float32 ``(N, L)`` binary targets, NaN where a label is to be ignored;
- ``split.npy``: int8 ``(N,)`` with 0 train, 1 validation, 2 test;
- optional ``grades.npy`` (int16 ``(N,)``, e.g. DR grade) and ``groups.npy`` (patient ids).

It is written into a temporary sibling and renamed into place, so a reader never sees
a half-written dataset and an interrupted preparation leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

SPLITS = {"train": 0, "val": 1, "test": 2}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset on disk; arrays are memory-mapped on first use."""

    root: Path
    meta: dict = field(compare=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> PreparedDataset:
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{root} is not a prepared dataset (no meta.json)")
        return cls(root=root, meta=json.loads(meta_path.read_text()))

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def label_names(self) -> list[str]:
        return list(self.meta["label_names"])

    @property
    def num_labels(self) -> int:
        return len(self.meta["label_names"])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @cached_property
    def images(self) -> np.ndarray:
        return np.load(self.root / "images.npy", mmap_mode="r")

    @cached_property
    def targets(self) -> np.ndarray:
        return np.load(self.root / "targets.npy")

    @cached_property
    def split(self) -> np.ndarray:
        return np.load(self.root / "split.npy")

    @cached_property
    def grades(self) -> np.ndarray | None:
        path = self.root / "grades.npy"
        return np.load(path) if path.is_file() else None

    @cached_property
    def groups(self) -> np.ndarray | None:
        """Each image's patient id (CheXpert, EyePACS, a folder's ``patient_column``); None without patients."""
        path = self.root / "groups.npy"
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == SPLITS[split])

    def stratum(self, index: np.ndarray) -> np.ndarray:
        """A class key per example for stratified subsets (grade if known, else labels)."""
        if self.grades is not None:
            return self.grades[index].astype(np.int64)
        bits = np.nan_to_num(self.targets[index], nan=0.0) > 0.5
        # Label-powerset key, truncated to the first 8 labels to keep strata populated.
        return (bits[:, :8] * (1 << np.arange(min(8, bits.shape[1])))).sum(axis=1)

    def training_subset(self, data_size: int | None, *, seed: int) -> np.ndarray:
        """Seeded, label-stratified, nested training indices (``None`` = all).

        For a fixed seed every smaller subset is a prefix of every larger one, so the
        5 000-image subset sits inside the 10 000-image one and all models and inits
        of a seed see the same images (paired comparisons).
        """
        pool = self.indices("train")
        if data_size is None:
            return np.sort(pool)
        if data_size > len(pool):
            raise ValueError(
                f"data_size {data_size} is larger than the {len(pool)} training images of dataset {self.name!r}"
            )
        order = stratified_order(self.stratum(pool), seed=seed)
        return np.sort(pool[order[:data_size]])


def stratified_order(strata: np.ndarray, *, seed: int) -> np.ndarray:
    """A permutation whose every prefix holds each stratum in proportion.

    Each member of a stratum of size n gets the rank (i + u) / n for its shuffled
    position i and a jitter u; sorting by rank interleaves the strata evenly.
    """
    rng = np.random.default_rng(seed)
    ranks = np.empty(len(strata), dtype=np.float64)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        shuffled = rng.permutation(members)
        ranks[shuffled] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(ranks, kind="stable")


class PreparedDatasetWriter:
    """Writes a prepared dataset atomically: use as a context manager."""

    def __init__(self, root: Path, *, num_images: int, image_shape: tuple[int, int, int]) -> None:
        self.root = Path(root)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.", dir=self.root.parent))
        self.images = np.lib.format.open_memmap(
            self._tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(num_images, *image_shape)
        )

    def __enter__(self) -> PreparedDatasetWriter:
        return self

    def keep(self, rows: np.ndarray) -> None:
        """Keeps only image ``rows`` (in order), e.g. to drop files that failed to decode.

        The images are copied into a smaller array in the temporary directory, chunk by
        chunk, so memory stays bounded for large datasets.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == len(self.images) and np.array_equal(rows, np.arange(len(rows))):
            return
        shape = (len(rows), *self.images.shape[1:])
        kept = np.lib.format.open_memmap(self._tmp / "images.kept.npy", mode="w+", dtype=np.uint8, shape=shape)
        for start in range(0, len(rows), 256):
            kept[start : start + 256] = self.images[rows[start : start + 256]]
        kept.flush()
        del self.images
        os.replace(self._tmp / "images.kept.npy", self._tmp / "images.npy")
        self.images = kept

    def finish(
        self,
        *,
        meta: dict,
        targets: np.ndarray,
        split: np.ndarray,
        grades: np.ndarray | None = None,
        groups: np.ndarray | None = None,
    ) -> PreparedDataset:
        n = len(self.images)
        for what, array in (("targets", targets), ("split", split)):
            if len(array) != n:
                raise ValueError(f"{what} has {len(array)} rows for {n} images")
        for split_name, code in SPLITS.items():
            if not np.any(split == code):
                raise ValueError(f"dataset {meta.get('name')!r} has an empty {split_name} split")
        self.images.flush()
        np.save(self._tmp / "targets.npy", targets.astype(np.float32))
        np.save(self._tmp / "split.npy", split.astype(np.int8))
        if grades is not None:
            np.save(self._tmp / "grades.npy", grades.astype(np.int16))
        if groups is not None:
            np.save(self._tmp / "groups.npy", np.asarray(groups))
        meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "counts": {s: int(np.sum(split == c)) for s, c in SPLITS.items()},
        }
        (self._tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        del self.images
        if self.root.exists():
            # Another process prepared the same dataset first; theirs is as good as ours.
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            os.replace(self._tmp, self.root)
        return PreparedDataset.open(self.root)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tmp.exists():
            shutil.rmtree(self._tmp, ignore_errors=True)
