"""Pretrained weight sources as data, and loading state dicts from URIs.

A :class:`PretrainedSource` records where weights come from (a pinned URI), the
preprocessing they expect and which registered model they fit. Weights are loaded
from a URI by :func:`load_state_dict_from_uri`:

=====================================  ==================================================
URI                                    resolved by
=====================================  ==================================================
``/path/w.pt``, ``file:///path/w.pt``  the local file
``s3://bucket/key``                    boto3 (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
                                       usual credential chain), cached under
                                       ``$TRANSFUSION_HOME/cache/weights``
``torchvision:resnet50/IMAGENET1K_V1`` the torch hub cache (``torch.hub.get_dir()/checkpoints``),
                                       downloaded there when the network allows
``models:/name/version``               a loader registered in :data:`SCHEME_LOADERS`
                                       (the MLflow tracking module registers ``models``)
=====================================  ==================================================

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint that
carries pickled code is refused, never executed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import torch

from transfusion.constants import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD
from transfusion.home import transfusion_home
from transfusion.object_store import s3_client, s3_endpoint
from transfusion.registry import Registry

logger = logging.getLogger(__name__)


DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Preprocessing:
    """Input normalisation a set of weights was trained with.

    Attributes:
        mean: Per-channel mean subtracted from inputs scaled to [0, 1].
        std: Per-channel standard deviation divided out after the mean.
        resolution: Square input side the weights were trained at.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resolution: int


@dataclass(frozen=True)
class SourceQuality:
    """How good a pretrained source is at its own task, measured when it was made.

    Attributes:
        dataset: What it was trained on (``ImageNet-1k``, ``imagenet-folder``, ``synthetic-shapes``).
        top1: Top-1 accuracy (fraction) on held-out images of that set; NaN if not measured.
        top5: Top-5 accuracy (fraction); NaN if not measured.
        epochs: Passes over the training images; NaN if unknown.
        images_seen: Training images drawn (with repeats); 0 if unknown.
    """

    dataset: str
    top1: float
    top5: float
    epochs: float
    images_seen: int = 0

    TAG_PREFIX = "source."

    def is_weak(self, *, min_epochs: float, min_top1: float) -> bool:
        """Trained for fewer than ``min_epochs`` or below ``min_top1``: its transfer says little about ImageNet's."""
        return (not math.isnan(self.epochs) and self.epochs < min_epochs) or (
            not math.isnan(self.top1) and self.top1 < min_top1
        )

    def describe(self) -> str:
        def pct(value: float) -> str:
            return "?" if math.isnan(value) else f"{100 * value:.1f} %"

        epochs = "? epochs" if math.isnan(self.epochs) else f"{self.epochs:.3g} epochs"
        return f"{self.dataset}: top-1 {pct(self.top1)}, top-5 {pct(self.top5)}, {epochs}, {self.images_seen} images"

    def as_tags(self) -> dict[str, str]:
        return {
            f"{self.TAG_PREFIX}dataset": self.dataset,
            f"{self.TAG_PREFIX}top1": f"{self.top1:.6g}",
            f"{self.TAG_PREFIX}top5": f"{self.top5:.6g}",
            f"{self.TAG_PREFIX}epochs": f"{self.epochs:.6g}",
            f"{self.TAG_PREFIX}images_seen": str(self.images_seen),
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> SourceQuality | None:
        """The quality recorded by :meth:`as_tags`, or None for a source made before it was recorded."""
        p = cls.TAG_PREFIX
        if f"{p}dataset" not in tags:
            return None
        return cls(
            dataset=tags[f"{p}dataset"],
            top1=float(tags.get(f"{p}top1", "nan")),
            top5=float(tags.get(f"{p}top5", "nan")),
            epochs=float(tags.get(f"{p}epochs", "nan")),
            images_seen=int(tags.get(f"{p}images_seen", "0")),
        )


WEAK, MEASURED_OK, UNMEASURED = "weak", "ok", "unmeasured"


def quality_label(quality: SourceQuality | None, *, min_epochs: float, min_top1: float) -> str:
    """``weak``, ``ok`` or ``unmeasured`` (a source whose accuracy nobody recorded)."""
    if quality is None:
        return UNMEASURED
    return WEAK if quality.is_weak(min_epochs=min_epochs, min_top1=min_top1) else MEASURED_OK


# The torchvision V1 recipe: 90 epochs of ImageNet-1k's 1 281 167 training images.
_TORCHVISION_V1_IMAGES = 90 * 1_281_167


@dataclass(frozen=True)
class PretrainedSource:
    """A named, pinned set of pretrained weights.

    Attributes:
        name: Registry name.
        uri: Where the state dict comes from (see :func:`load_state_dict_from_uri`).
        preprocessing: Normalisation and resolution the weights expect.
        description: What the weights are.
        model: Registered model name whose state dict they fit.
        quality: Accuracy on the source task as its publisher reports it.
    """

    name: str
    uri: str
    preprocessing: Preprocessing
    description: str
    model: str
    quality: SourceQuality | None = None


@dataclass(frozen=True)
class LoadedWeights:
    """A state dict with its provenance.

    Attributes:
        state_dict: Tensor name -> tensor, on CPU.
        uri: The URI it was loaded from.
        sha256: Hex digest of the file read.
        path: The local file read.
    """

    state_dict: dict[str, torch.Tensor]
    uri: str
    sha256: str
    path: Path


PRETRAINED: Registry[PretrainedSource] = Registry("pretrained source")

for _source in (
    PretrainedSource(
        name="torchvision-resnet50-imagenet1k-v1",
        uri="torchvision:resnet50/IMAGENET1K_V1",
        preprocessing=Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, resolution=224),
        description="torchvision ResNet-50 ImageNet-1k weights V1 (top-1 76.13 %)",
        model="resnet50",
        quality=SourceQuality("ImageNet-1k", 0.7613, 0.92862, 90.0, _TORCHVISION_V1_IMAGES),
    ),
    PretrainedSource(
        name="torchvision-inception_v3-imagenet1k-v1",
        uri="torchvision:inception_v3/IMAGENET1K_V1",
        preprocessing=Preprocessing(mean=INCEPTION_MEAN, std=INCEPTION_STD, resolution=299),
        description="torchvision Inception-v3 ImageNet-1k V1, ported from TF (top-1 77.29 %)",
        model="inception_v3",
        # Ported from TF-Slim, whose schedule torchvision does not state: epochs unknown.
        quality=SourceQuality("ImageNet-1k", 0.77294, 0.93450, math.nan, 0),
    ),
):
    PRETRAINED.add(_source.name, _source)


def get_pretrained_source(name: str) -> PretrainedSource:
    """The registered source ``name``; unknown names raise with the valid ones."""
    return PRETRAINED.get(name)


def published_quality(uri: str) -> SourceQuality | None:
    """The quality of a registered source loaded from ``uri`` (e.g. ``torchvision:resnet50/IMAGENET1K_V1``)."""
    return next((PRETRAINED.get(n).quality for n in PRETRAINED.names() if PRETRAINED.get(n).uri == uri), None)


def list_pretrained_sources() -> list[str]:
    return PRETRAINED.names()


def load_pretrained(name: str) -> LoadedWeights:
    """Loads the state dict of the registered source ``name``."""
    return load_state_dict_from_uri(get_pretrained_source(name).uri)


def weights_cache_dir() -> Path:
    return transfusion_home() / "cache" / "weights"


def _offline() -> bool:
    return os.environ.get("TRANSFUSION_OFFLINE", "").lower() in ("1", "true", "yes")


def _file_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {uri!r} names host {parsed.netloc!r}; use file:///absolute/path")
    return Path(unquote(parsed.path))


def _s3_path(uri: str) -> Path:
    """Downloads ``s3://bucket/key`` once into the weights cache, keyed by URI hash.

    The cache is keyed by URI, not object version: clear it if an object is overwritten.
    """
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise ValueError(f"S3 URI {uri!r} needs both a bucket and a key: s3://bucket/key")
    dest = weights_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16] / PurePosixPath(key).name
    if dest.exists():
        logger.info("using cached %s for %s", dest, uri)
        return dest

    import botocore.exceptions

    endpoint = s3_endpoint()
    client = s3_client()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename, so concurrent workers never read a partial file.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp_name)
        os.replace(tmp_name, dest)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise ValueError(f"could not download {uri} (endpoint {endpoint or 'AWS default'}): {err}") from err
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    logger.info("downloaded %s to %s", uri, dest)
    return dest


def _download(url: str, dest: Path) -> None:
    """Fetches ``url`` to ``dest`` with a timeout, checking torchvision's hash prefix."""
    match = re.search(r"-([a-f0-9]+)\.", PurePosixPath(urlparse(url).path).name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if match and not digest.hexdigest().startswith(match.group(1)):
            raise ValueError(f"download of {url} has sha256 {digest.hexdigest()}, expected prefix {match.group(1)}")
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def _torchvision_weights(uri: str) -> Any:
    """The torchvision ``Weights`` enum member named by ``torchvision:<arch>/<WEIGHTS>``."""
    import torchvision.models

    arch, _, version = uri.split(":", 1)[1].partition("/")
    try:
        weights_enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        raise ValueError(
            f"{uri}: unknown torchvision model {arch!r}; valid: {', '.join(torchvision.models.list_models())}"
        ) from None
    try:
        return weights_enum[version]
    except KeyError:
        valid = ", ".join(w.name for w in weights_enum)
        raise ValueError(f"{uri}: unknown weights {version!r} for {arch}; valid: {valid}") from None


def torchvision_cache_path(uri: str) -> Path:
    """Where the torch hub cache holds the file of ``torchvision:<arch>/<WEIGHTS>``."""
    url = _torchvision_weights(uri).url
    return Path(torch.hub.get_dir()) / "checkpoints" / PurePosixPath(urlparse(url).path).name


def _torchvision_path(uri: str) -> Path:
    """``torchvision:<arch>/<WEIGHTS>``: the file in the torch hub cache, fetched if missing."""
    weights = _torchvision_weights(uri)
    path = torchvision_cache_path(uri)
    if path.exists():
        return path
    if _offline():
        reason = "TRANSFUSION_OFFLINE is set"
    else:
        try:
            _download(weights.url, path)
            return path
        except OSError as err:  # URLError, timeouts and refused connections are OSErrors
            reason = f"download failed: {err}"
    raise ValueError(
        f"{uri}: weights file not found in the torch hub cache at {path} ({reason}). "
        f"Download {weights.url} on a machine with network access and place it at that path "
        "(or point TORCH_HOME at a cache that holds it)."
    )


# URI scheme -> function returning a local file. Other modules register more schemes
# (the MLflow tracking module registers "models").
SCHEME_LOADERS: dict[str, Callable[[str], Path]] = {
    "file": _file_path,
    "s3": _s3_path,
    "torchvision": _torchvision_path,
}


def resolve_uri(uri: str) -> Path:
    """The local file holding the weights named by ``uri`` (downloading if needed)."""
    scheme = urlparse(uri).scheme
    # A one-letter scheme is a Windows drive, not a URI.
    if len(scheme) <= 1:
        path = Path(uri).expanduser()
    else:
        try:
            loader = SCHEME_LOADERS[scheme]
        except KeyError:
            raise ValueError(
                f"no loader for URI scheme {scheme!r} in {uri!r}; "
                f"known: {', '.join(sorted(SCHEME_LOADERS))}. Register one in "
                "transfusion.pretrained.SCHEME_LOADERS (the MLflow tracking module registers "
                "'models')."
            ) from None
        path = loader(uri)
    if not path.is_file():
        raise ValueError(f"weights file for {uri!r} not found at {path}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract_state_dict(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    """A plain state dict, or the one under ``"state_dict"``/``"model"`` of a checkpoint."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{uri}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    not_tensors = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{uri}: not a state dict; non-tensor values under keys {not_tensors[:5]} "
            "(expected a state dict or a dict with 'state_dict' or 'model')"
        )
    state_dict = dict(obj)
    # Checkpoints saved from DataParallel/DDP wrap every name in "module.".
    if state_dict and all(key.startswith("module.") for key in state_dict):
        logger.info("%s: stripping the 'module.' prefix of a DataParallel checkpoint", uri)
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def load_state_dict_from_uri(uri: str | os.PathLike[str]) -> LoadedWeights:
    """Loads a state dict from a local path or URI, refusing pickled code.

    Args:
        uri: A local path, ``file://``, ``s3://bucket/key``, ``torchvision:<arch>/<WEIGHTS>``
            or any scheme in :data:`SCHEME_LOADERS` (e.g. ``models:/name/version``).

    Returns:
        The state dict on CPU, the URI, the file's sha256 and its local path.

    Raises:
        ValueError: The URI cannot be resolved, the file carries pickled code, or it
            holds no state dict.
    """
    uri = os.fspath(uri)
    path = resolve_uri(uri)
    sha256 = file_sha256(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{uri} ({path}): torch.load(weights_only=True) refuses to load pickled code or an "
            "unreadable file; save plain tensors with torch.save(model.state_dict(), ...). "
            f"Cause: {err}"
        ) from err
    logger.info("loaded weights %s (sha256 %s)", uri, sha256)
    return LoadedWeights(state_dict=_extract_state_dict(obj, uri), uri=uri, sha256=sha256, path=path)
