"""What a pretrained source is to the tasks layer: its registered name, where it resolves now
(without pretraining), its quality and the tags every run that transfers from it carries.
Shared by the pretraining and the training tasks (neither imports the other for it)."""

from __future__ import annotations

from transfusion import tracking
from transfusion.config import DOMAIN_PREFIX, WeakSourceSettings
from transfusion.config import source_label as grid_source_label
from transfusion.models import model_key_name
from transfusion.pretrained import WEAK, SourceQuality, published_quality, quality_label, source_at, source_for

# Models that have torchvision IMAGENET1K_V1 weights (pinned: DEFAULT may change).
TORCHVISION_IMAGENET = {"resnet50": "resnet50", "inception-v3": "inception_v3", "slim-resnet50": "resnet50"}
SYNTHETIC_SOURCE = "synthetic"


def registered_name(model: str, source: str) -> str:
    # The model's pre-rename spelling: versions registered before the rename stay found.
    return f"transfusion-{model_key_name(model)}-{source}"


def source_label(source: str) -> str:
    """``synthetic`` stays, ``domain:<dataset>`` registers as ``domain-<dataset>``; a folder of
    ImageNet-style images registers as ``imagenet``."""
    if source == SYNTHETIC_SOURCE or source.startswith(DOMAIN_PREFIX):
        return grid_source_label(source)
    return "imagenet"


def source_quality(uri: str) -> SourceQuality | None:
    """What a source URI's registry says of its quality (None: never measured)."""
    if uri.startswith("models:/"):
        return SourceQuality.from_tags(tracking.model_version_tags(uri))
    return published_quality(uri)


def source_tags(uri: str, quality: SourceQuality | None, weak_source: WeakSourceSettings) -> dict[str, str]:
    """Tags of a source (on its registered version, and on every run that transfers from it)."""
    label = quality_label(quality, min_epochs=weak_source.min_epochs, min_top1=weak_source.min_top1)
    tags = {"source.uri": uri, "source.quality": label, **(quality.as_tags() if quality else {})}
    registered = source_at(uri)
    if registered is not None:
        tags.update({k: v for k, v in registered.as_tags().items() if k != "source"})
    tags["source.description"] = f"{uri}: {quality.describe() if quality else 'accuracy not recorded'} ({label})"
    if label == WEAK:
        tags["source.description"] += (
            f"; weak = under {weak_source.min_epochs:g} epochs or top-1 {100 * weak_source.min_top1:.0f} %"
        )
    return tags


def existing_source_uri(model: str, pretrained: str) -> str | None:
    """The URI ``pretrained`` resolves to for ``model`` now, without pretraining (None: none yet).

    What an analysis identifies a grid's transfer jobs by: it never trains a source.
    """
    if pretrained == SYNTHETIC_SOURCE or pretrained.startswith(DOMAIN_PREFIX):
        return tracking.latest_model_version(registered_name(model, source_label(pretrained)))
    if pretrained == "imagenet":
        if model in TORCHVISION_IMAGENET:
            return f"torchvision:{TORCHVISION_IMAGENET[model]}/IMAGENET1K_V1"
        return tracking.latest_model_version(registered_name(model, "imagenet"))
    registered = source_for(pretrained)
    return registered.uri if registered is not None else pretrained
