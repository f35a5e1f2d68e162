"""Dataset registry: each dataset is prepared once into a :class:`PreparedDataset`.

A preparer is registered under a dataset name and turns a source (a path, an
``s3://`` URI, or nothing for procedural data) into the prepared on-disk form under
``$TRANSFUSION_HOME/data/<name>/<version key>``. Preparing again finds the cache and
decodes nothing.

A source-backed dataset is a :class:`~transfusion.data.declared.DatasetDeclaration`
(recipe, options, what the source must be) plus a row reader; one template,
:func:`~transfusion.data.declared.prepare_declared`, does the rest for all of them
(``chexpert.py``, ``retina.py``, ``medmnist.py``, ``folder.py``, ``imagenet_folder.py``).
The procedural sets are :class:`~transfusion.data.synthetic.ProceduralSet` declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transfusion.data.prepared import PreparedDataset, PreparedDatasetWriter, stratified_order
from transfusion.home import transfusion_home
from transfusion.registry import Registry

# Options every dataset accepts that change how a preparation runs, not what it produces:
# never part of a prepared set's version key.
RUNTIME_OPTIONS = ("skip_bad", "workers")


@dataclass(frozen=True)
class PrepareRequest:
    """What a preparer is asked for: dataset, source, resolution and options."""

    name: str
    source: str | None
    resolution: int
    options: tuple[tuple[str, object], ...] = ()

    def option(self, key: str, default: object = None) -> object:
        return dict(self.options).get(key, default)


Preparer = Callable[[PrepareRequest, Path], PreparedDataset]
DATASETS: Registry[Preparer] = Registry("dataset")


@dataclass(frozen=True)
class DatasetVersion:
    """A dataset's version key as preparing it would give it, found without decoding an image.

    Attributes:
        version: the prepared set's ``meta["version"]``: it changes whenever its images or labels do.
        train_images: the training pool's size where known without preparing (a procedural
            set's parameters, or a set already prepared); None otherwise.
    """

    version: str
    train_images: int | None = None


# Datasets whose version is cheap: from a generator's parameters, or a source's listing and
# index fingerprints. A dataset without one is prepared to read its version.
Versioner = Callable[[PrepareRequest, Path], DatasetVersion]
DATASET_VERSIONS: Registry[Versioner] = Registry("dataset version")


def list_datasets() -> list[str]:
    return DATASETS.names()


def prepare_dataset(
    name: str,
    *,
    source: str | None = None,
    resolution: int,
    options: dict | None = None,
    home: Path | None = None,
) -> PreparedDataset:
    """Prepares (or finds prepared) dataset ``name`` at ``resolution`` pixels."""
    preparer = DATASETS.get(name)
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    request = PrepareRequest(name, source, resolution, tuple(sorted((options or {}).items())))
    data_root = (home or transfusion_home()) / "data" / name
    return preparer(request, data_root)


def dataset_version(
    name: str,
    *,
    source: str | None = None,
    resolution: int,
    options: dict | None = None,
    home: Path | None = None,
) -> DatasetVersion:
    """The version :func:`prepare_dataset` would give this dataset, without reading its images.

    A procedural set's version comes from its generator's parameters; a source-backed
    set's from the source's identity (an S3 prefix's listing, as mirrored) and its index
    files' fingerprints -- the same key the preparer computes before it decodes.
    """
    DATASETS.get(name)  # an unknown name lists the valid ones
    if name not in DATASET_VERSIONS:
        prepared = prepare_dataset(name, source=source, resolution=resolution, options=options, home=home)
        return DatasetVersion(str(prepared.meta["version"]), len(prepared.indices("train")))
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    request = PrepareRequest(name, source, resolution, tuple(sorted((options or {}).items())))
    return DATASET_VERSIONS.get(name)(request, (home or transfusion_home()) / "data" / name)


# Importing the preparer modules registers them.
from transfusion.data import (  # noqa: E402,F401
    chexpert,
    folder,
    imagenet_folder,
    medmnist,
    retina,
    synthetic,
    synthetic_chest,
)

__all__ = [
    "DATASETS",
    "DATASET_VERSIONS",
    "DatasetVersion",
    "PrepareRequest",
    "PreparedDataset",
    "PreparedDatasetWriter",
    "dataset_version",
    "list_datasets",
    "prepare_dataset",
    "stratified_order",
    "transfusion_home",
]
