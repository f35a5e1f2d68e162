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
``timm:convnext_tiny.fb_in1k``         the local Hugging Face cache (``HF_HUB_CACHE``), never
                                       the network; ``.safetensors`` or ``.bin``
``https://host/w.pth``                 ``$TRANSFUSION_HOME/cache/weights/url``, downloaded
                                       there when the network allows
``cache:radimagenet/w.pth``            a file placed by hand under
                                       ``$TRANSFUSION_HOME/cache/weights``
=====================================  ==================================================

A checkpoint may name our models' tensors differently (a MoCo query encoder, a
RadImageNet ``nn.Sequential``, timm's names): :func:`apply_layout` maps it, detecting
the layout when the source does not declare one.

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
from transfusion.models import canonical_model_name
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


SUPERVISED, SELF_SUPERVISED, DOMAIN, REGISTERED = "supervised", "self-supervised", "domain", "registered"


@dataclass(frozen=True)
class PretrainedSource:
    """A named, pinned set of pretrained weights.

    Attributes:
        name: Registry name.
        uri: Where the state dict comes from (see :func:`load_state_dict_from_uri`).
        preprocessing: Normalisation and resolution the weights expect.
        description: What the weights are.
        model: Registered model name whose state dict they fit.
        quality: Accuracy on the source task as its publisher reports it (linear-probe
            accuracy for self-supervised weights).
        kind: ``supervised``, ``self-supervised``, ``domain`` or ``registered``.
        provenance: The paper or recipe that made the weights, and the data they saw.
        licence: The weights' licence as their publisher states it.
        layout: Key layout of the file (:data:`KEY_LAYOUTS`); ``auto`` detects it.
        also_fits: Other models that take these weights (a slim ResNet-50's stem and
            early stages through weight transfusion(k)).
        how_to_get: What to do when the file is not on this machine.
    """

    name: str
    uri: str
    preprocessing: Preprocessing
    description: str
    model: str
    quality: SourceQuality | None = None
    kind: str = SUPERVISED
    provenance: str = ""
    licence: str = ""
    layout: str = "auto"
    also_fits: tuple[str, ...] = ()
    how_to_get: str = ""

    def fits(self, model: str) -> bool:
        model = canonical_model_name(model)
        return model == self.model or model in self.also_fits

    def as_tags(self) -> dict[str, str]:
        """What a run that transfers from this source records about it."""
        return {
            "source": self.name,
            "source.kind": self.kind,
            "source.provenance": self.provenance,
            "source.licence": self.licence,
        }


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

_IMAGENET_224 = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, resolution=224)
_RESNET50_FAMILY = ("slim-resnet50",)


def _timm_source(
    name: str,
    timm_tag: str,
    *,
    description: str,
    quality: SourceQuality,
    provenance: str,
    preprocessing: Preprocessing = _IMAGENET_224,
) -> PretrainedSource:
    """A timm checkpoint ``<arch>.<tag>`` in the local Hugging Face cache, for our ``<arch>`` model."""
    arch = canonical_model_name(timm_tag.split(".", 1)[0])
    return PretrainedSource(
        name=name,
        uri=f"timm:{timm_tag}",
        preprocessing=preprocessing,
        description=description,
        model=arch,
        quality=quality,
        provenance=provenance,
        licence="Apache-2.0",
        layout="timm",
    )


_NAN = math.nan

for _source in (
    PretrainedSource(
        name="torchvision-resnet50-imagenet1k-v1",
        uri="torchvision:resnet50/IMAGENET1K_V1",
        preprocessing=_IMAGENET_224,
        description="torchvision ResNet-50 ImageNet-1k weights V1 (top-1 76.13 %)",
        model="resnet50",
        quality=SourceQuality("ImageNet-1k", 0.7613, 0.92862, 90.0, _TORCHVISION_V1_IMAGES),
        provenance="He et al. 2016 recipe, 90 epochs on ImageNet-1k (torchvision reference scripts)",
        licence="BSD-3-Clause (torchvision)",
        also_fits=_RESNET50_FAMILY,
    ),
    PretrainedSource(
        name="torchvision-resnet50-imagenet1k-v2",
        uri="torchvision:resnet50/IMAGENET1K_V2",
        preprocessing=_IMAGENET_224,
        description="torchvision ResNet-50 ImageNet-1k weights V2, the 2021 recipe (top-1 80.86 %)",
        model="resnet50",
        quality=SourceQuality("ImageNet-1k", 0.80858, 0.95434, 600.0, 600 * 1_281_167),
        provenance="torchvision's 2021 recipe (600 epochs, mixup/cutmix, EMA) on ImageNet-1k",
        licence="BSD-3-Clause (torchvision)",
        also_fits=_RESNET50_FAMILY,
    ),
    PretrainedSource(
        name="torchvision-inception_v3-imagenet1k-v1",
        uri="torchvision:inception_v3/IMAGENET1K_V1",
        preprocessing=Preprocessing(mean=INCEPTION_MEAN, std=INCEPTION_STD, resolution=299),
        description="torchvision Inception-v3 ImageNet-1k V1, ported from TF (top-1 77.29 %)",
        model="inception-v3",
        # Ported from TF-Slim, whose schedule torchvision does not state: epochs unknown.
        quality=SourceQuality("ImageNet-1k", 0.77294, 0.93450, _NAN, 0),
        provenance="Szegedy et al. 2016, TF-Slim weights ported by torchvision",
        licence="Apache-2.0 (TF-Slim)",
    ),
    PretrainedSource(
        name="dino-resnet50",
        uri="https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        preprocessing=_IMAGENET_224,
        description="DINO self-supervised ResNet-50, no labels (linear probe 75.3 %)",
        model="resnet50",
        # The schedule of this checkpoint is not recorded here: epochs unknown.
        quality=SourceQuality("ImageNet-1k (no labels, linear probe)", 0.753, _NAN, _NAN, 0),
        kind=SELF_SUPERVISED,
        provenance="Caron et al. 2021 (DINO), self-distillation on ImageNet-1k images without labels",
        licence="Apache-2.0",
        layout="plain",
        also_fits=_RESNET50_FAMILY,
    ),
    PretrainedSource(
        name="mocov2-resnet50",
        uri="https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        preprocessing=_IMAGENET_224,
        description="MoCo v2 self-supervised ResNet-50, no labels (linear probe 71.1 %)",
        model="resnet50",
        quality=SourceQuality("ImageNet-1k (no labels, linear probe)", 0.711, _NAN, 800.0, 800 * 1_281_167),
        kind=SELF_SUPERVISED,
        provenance="Chen et al. 2020 (MoCo v2), 800 epochs on ImageNet-1k images without labels",
        licence="CC-BY-NC-4.0",
        layout="moco",
        also_fits=_RESNET50_FAMILY,
    ),
    PretrainedSource(
        name="radimagenet-resnet50",
        uri="cache:radimagenet/RadImageNet-ResNet50_notop.pth",
        preprocessing=_IMAGENET_224,
        description="RadImageNet ResNet-50: supervised on 1.35 M CT, MRI and ultrasound images",
        model="resnet50",
        quality=SourceQuality("RadImageNet (165 radiology classes)", _NAN, _NAN, _NAN, 0),
        kind=DOMAIN,
        provenance="Mei et al. 2022 (RadImageNet), supervised on 1.35 M radiology images",
        licence="RadImageNet terms of use (research; weights by request)",
        layout="sequential-resnet",
        also_fits=_RESNET50_FAMILY,
        how_to_get="request the PyTorch ResNet-50 weights at https://www.radimagenet.com",
    ),
    _timm_source(
        "timm-convnext_tiny-in1k",
        "convnext_tiny.fb_in1k",
        description="ConvNeXt-Tiny supervised on ImageNet-1k (top-1 82.1 %)",
        quality=SourceQuality("ImageNet-1k", 0.821, _NAN, 300.0, 300 * 1_281_167),
        provenance="Liu et al. 2022 (ConvNeXt), 300 epochs on ImageNet-1k",
    ),
    _timm_source(
        "timm-vit_small_patch16_224-augreg-in21k-ft-in1k",
        "vit_small_patch16_224.augreg_in21k_ft_in1k",
        description="ViT-S/16 AugReg, ImageNet-21k then fine-tuned on ImageNet-1k (top-1 81.4 %)",
        quality=SourceQuality("ImageNet-21k + ImageNet-1k", 0.814, _NAN, _NAN, 0),
        provenance="Steiner et al. 2022 (How to train your ViT), ImageNet-21k pre-training, ImageNet-1k fine-tuning",
        preprocessing=Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resolution=224),
    ),
    _timm_source(
        "timm-efficientnet_b0-in1k",
        "efficientnet_b0.ra_in1k",
        description="EfficientNet-B0 supervised on ImageNet-1k, timm RandAugment recipe (top-1 77.7 %)",
        quality=SourceQuality("ImageNet-1k", 0.777, _NAN, _NAN, 0),
        provenance="Tan & Le 2019 architecture, trained by timm (RandAugment recipe) on ImageNet-1k",
    ),
):
    PRETRAINED.add(_source.name, _source)


# --- key layouts: how a checkpoint names the tensors of our models --------------------

StateDict = dict[str, torch.Tensor]


def _strip_prefixes(*prefixes: str) -> Callable[[StateDict], StateDict]:
    def strip(state: StateDict) -> StateDict:
        out = {}
        for key, value in state.items():
            for prefix in prefixes:
                if key.startswith(prefix):
                    out[key.removeprefix(prefix)] = value
                    break
        return out

    return strip


# Sequential(*list(resnet.children())[:-1]) numbers the children: 0 conv1, 1 bn1, 2 relu,
# 3 maxpool, 4..7 layer1..4.
_SEQUENTIAL_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _sequential_resnet(state: StateDict) -> StateDict:
    out = {}
    for key, value in state.items():
        head, _, rest = key.removeprefix("backbone.").partition(".")
        if head in _SEQUENTIAL_RESNET and rest:
            out[f"{_SEQUENTIAL_RESNET[head]}.{rest}"] = value
    return out


# Name -> function from a checkpoint's state dict to our models' key names. Keys a
# layout does not map (projection heads, momentum encoders, queues) are dropped.
KEY_LAYOUTS: dict[str, Callable[[StateDict], StateDict]] = {
    "plain": dict,  # torchvision names, as saved by torch.save(model.state_dict())
    "timm": lambda state: {f"net.{key}": value for key, value in state.items()},  # our timm wrappers
    "moco": _strip_prefixes("module.encoder_q.", "encoder_q."),  # MoCo v1-v3: the query encoder
    "byol": _strip_prefixes("online_network.encoder.", "backbone.", "encoder."),  # BYOL and solo-learn
    "dino": _strip_prefixes("teacher.backbone.", "backbone.", "module.backbone."),  # DINO training checkpoints
    "sequential-resnet": _sequential_resnet,  # RadImageNet: nn.Sequential of torchvision children
}


def layout_fit(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> int:
    """How many of the model's tensors the state dict gives, by name and shape (the stem's input
    channels may differ: a 3-channel source fits a 1-channel model)."""
    fit = 0
    for key, tensor in model_state.items():
        other = state.get(key)
        if other is not None and _same_but_input_channels(other.shape, tensor.shape):
            fit += 1
    return fit


def _same_but_input_channels(a: torch.Size, b: torch.Size) -> bool:
    return a == b or (len(a) == len(b) == 4 and a[:1] + a[2:] == b[:1] + b[2:])


def apply_layout(
    state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    *,
    layout: str = "auto",
    what: str = "source",
) -> tuple[StateDict, str]:
    """The state dict under our key names, and the layout used.

    ``auto`` picks the layout that gives the most of the model's tensors (``plain``
    first on a tie). When none gives any, the state dict comes back as it is, so the
    init's own check names the missing and unexpected keys.

    Raises:
        ValueError: Unknown layout.
    """
    if layout != "auto" and layout not in KEY_LAYOUTS:
        raise ValueError(f"{what}: unknown key layout {layout!r}; valid: auto, {', '.join(KEY_LAYOUTS)}")
    candidates = list(KEY_LAYOUTS) if layout == "auto" else [layout]
    scored = [(layout_fit(model_state, KEY_LAYOUTS[name](state)), name) for name in candidates]
    best_fit, best = max(scored, key=lambda item: (item[0], -candidates.index(item[1])))
    if best_fit == 0:
        return dict(state), "plain"
    if best != "plain":
        logger.info("%s: read with the %r key layout (%d of the model's tensors)", what, best, best_fit)
    return KEY_LAYOUTS[best](state), best


def get_pretrained_source(name: str) -> PretrainedSource:
    """The registered source ``name``; unknown names raise with the valid ones."""
    return PRETRAINED.get(name)


def source_at(uri: str) -> PretrainedSource | None:
    """The registered source whose weights live at ``uri``, if any."""
    return next((PRETRAINED.get(n) for n in PRETRAINED.names() if PRETRAINED.get(n).uri == uri), None)


def published_quality(uri: str) -> SourceQuality | None:
    """The quality of a registered source loaded from ``uri`` (e.g. ``torchvision:resnet50/IMAGENET1K_V1``)."""
    source = source_at(uri)
    return source.quality if source else None


def missing_weights_error(name: str, source: PretrainedSource | None, err: ValueError) -> ValueError:
    """``err`` naming the source, with its registry note on how to get the file when it has one."""
    how = f"; to get it, {source.how_to_get}" if source and source.how_to_get else ""
    return ValueError(f"pretrained source {name}: {err}{how}")


def list_pretrained_sources() -> list[str]:
    return PRETRAINED.names()


def load_pretrained(name: str) -> LoadedWeights:
    """Loads the state dict of the registered source ``name``."""
    source = get_pretrained_source(name)
    try:
        return load_state_dict_from_uri(source.uri)
    except ValueError as err:
        if not source.how_to_get:
            raise
        raise missing_weights_error(name, source, err) from err


def source_for(pretrained: str) -> PretrainedSource | None:
    """The registered source a grid's ``pretrained`` entry names, or None for a URI or path."""
    return PRETRAINED.get(pretrained) if pretrained in PRETRAINED else None


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


def _missing(uri: str, path: Path, how: str) -> ValueError:
    return ValueError(f"{uri}: weights file not found at {path}; {how}")


def _cache_path(uri: str) -> Path:
    """``cache:<relative path>``: a file placed by hand under ``$TRANSFUSION_HOME/cache/weights``
    (weights their publisher hands out by request, so nothing can fetch them)."""
    relative = PurePosixPath(uri.split(":", 1)[1])
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"{uri}: cache: URIs name a relative path under the weights cache")
    path = weights_cache_dir() / relative
    if not path.is_file():
        raise _missing(uri, path, "place the file at that path (TRANSFUSION_HOME sets the folder), or give a path")
    return path


def _https_path(uri: str) -> Path:
    """``https://...``: the file in the weights cache, fetched there once when the network allows."""
    path = (
        weights_cache_dir()
        / "url"
        / hashlib.sha256(uri.encode()).hexdigest()[:16]
        / PurePosixPath(urlparse(uri).path).name
    )
    if path.is_file():
        return path
    if _offline():
        reason = "TRANSFUSION_OFFLINE is set"
    else:
        try:
            _download(uri, path)
            return path
        except OSError as err:
            reason = f"download failed: {err}"
    raise _missing(
        uri, path, f"{reason}; download it on a machine with network access and place it there, or give a path"
    )


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache timm reads (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _timm_path(uri: str) -> Path:
    """``timm:<model>.<tag>``: the weights timm would load, from the local Hugging Face cache only.

    The hub repository is ``timm/<model>.<tag>``; ``model.safetensors`` is preferred over
    ``pytorch_model.bin``. Nothing is downloaded: a job must not depend on the hub being up.
    """
    name = uri.split(":", 1)[1]
    if "." not in name:
        raise ValueError(f"{uri}: name a timm model with its weights tag, e.g. timm:convnext_tiny.fb_in1k")
    from huggingface_hub import try_to_load_from_cache

    repo = f"timm/{name}"
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
        if isinstance(found, str):
            return Path(found)
    raise ValueError(
        f"{uri}: not in the Hugging Face cache at {hf_cache_dir()}; run 'hf download {repo}' on a machine "
        "with network access and copy its cache here (HF_HUB_CACHE names the folder), or give the file as a path"
    )


# URI scheme -> function returning a local file. Other modules register more schemes
# (the MLflow tracking module registers "models").
SCHEME_LOADERS: dict[str, Callable[[str], Path]] = {
    "file": _file_path,
    "s3": _s3_path,
    "torchvision": _torchvision_path,
    "https": _https_path,
    "timm": _timm_path,
    "cache": _cache_path,
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


_SHA256_BY_FILE: dict[tuple[str, int, int], str] = {}


def weights_sha256(uri: str) -> str:
    """sha256 of the weights file ``uri`` resolves to (downloaded once): their identity by content.

    Hashed once per file version in a process (path, size, mtime), since a grid asks once
    per (model, source) and a warm process may run many grids.
    """
    path = resolve_uri(uri)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_BY_FILE:
        _SHA256_BY_FILE[key] = file_sha256(path)
    return _SHA256_BY_FILE[key]


def extract_state_dict(obj: Any, uri: str) -> dict[str, torch.Tensor]:
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
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")  # tensors only, by the format's design
        logger.info("loaded weights %s (sha256 %s)", uri, sha256)
        return LoadedWeights(state_dict=extract_state_dict(state, uri), uri=uri, sha256=sha256, path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{uri} ({path}): torch.load(weights_only=True) refuses to load pickled code or an "
            "unreadable file; save plain tensors with torch.save(model.state_dict(), ...). "
            f"Cause: {err}"
        ) from err
    logger.info("loaded weights %s (sha256 %s)", uri, sha256)
    return LoadedWeights(state_dict=extract_state_dict(obj, uri), uri=uri, sha256=sha256, path=path)
