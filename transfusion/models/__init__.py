"""Model registry: every model of the paper, built by name.

Every model is a :class:`CaptureModel`: it names the representations the analysis
compares the same way (``conv1``, ``stage1`` ... ``stageK``, ``pool``, ``logits``),
exposes ``forward_features`` (the map before global pooling) and a resettable head.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from transfusion.models.base import CaptureModel
from transfusion.registry import Registry

MODELS: Registry[Callable[..., CaptureModel]] = Registry("model")

# Families built on torchvision load on first use: importing torchvision costs seconds
# (it pulls in torch._dynamo), which every Ray worker of every job would pay otherwise.
LAZY_FAMILIES = {
    "resnet50": "resnet",
    "slim-resnet50": "resnet",
    "inception-v3": "inception",
    # timm imports torchvision and huggingface_hub: the same reason, more so.
    "convnext-tiny": "timm_family",
    "vit-small-patch16-224": "timm_family",
    "efficientnet-b0": "timm_family",
}

# One spelling per model, with hyphens; the spellings grids used before stay accepted.
# ``resnet50`` keeps its name: it has no underscore, and torchvision, timm and every
# source built on it (``dino-resnet50``, ``slim-resnet50``) spell it so.
MODEL_ALIASES = {
    "inception_v3": "inception-v3",
    "convnext_tiny": "convnext-tiny",
    "vit_small_patch16_224": "vit-small-patch16-224",
    "efficientnet_b0": "efficientnet-b0",
    "resnet-50": "resnet50",
    "slim-resnet-50": "slim-resnet50",
}
# The spelling a renamed model was stored under when its runs were keyed: job and grid
# keys hash this one, so a grid written with either spelling finds the runs of the other.
_KEY_NAMES = {name: old for old, name in MODEL_ALIASES.items() if "_" in old}
_LAZY_BUILDERS: dict[str, Callable[..., CaptureModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., CaptureModel]], Callable[..., CaptureModel]]:
    if name in LAZY_FAMILIES:

        def keep(builder: Callable[..., CaptureModel]) -> Callable[..., CaptureModel]:
            _LAZY_BUILDERS[name] = builder
            return builder

        return keep
    return MODELS.register(name)


def _lazy_builder(name: str, family: str) -> Callable[..., CaptureModel]:
    def build(**kwargs) -> CaptureModel:
        importlib.import_module(f"transfusion.models.{family}")
        return _LAZY_BUILDERS[name](**kwargs)

    build.__name__ = name.replace("-", "_")
    return build


for _name, _family in LAZY_FAMILIES.items():
    MODELS.add(_name, _lazy_builder(_name, _family))
for _old, _name in MODEL_ALIASES.items():
    MODELS.alias(_old, _name)


def canonical_model_name(name: str) -> str:
    """The registered spelling of a model name (``inception_v3`` -> ``inception-v3``); others unchanged."""
    return MODELS.canonical(name)


def model_key_name(name: str) -> str:
    """The spelling of model ``name`` that job and grid keys hash (its pre-rename one, if renamed)."""
    name = canonical_model_name(name)
    return _KEY_NAMES.get(name, name)


def create_model(name: str, *, num_classes: int, in_channels: int = 3) -> CaptureModel:
    """Builds the model ``name`` with ``num_classes`` logits for ``in_channels`` input."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


@dataclass(frozen=True)
class ModelFacts:
    """What a grid is checked against before any job starts."""

    stages: tuple[str, ...]  # conv1, stage1 ... stageK: what transfusion(k) can copy
    min_input_size: int


@functools.cache
def model_facts(name: str) -> ModelFacts:
    """Stages and minimum input size of model ``name``, read from an instance on the meta device.

    The meta device allocates no weights, so this costs milliseconds even for ResNet-50.
    """
    with torch.device("meta"):
        model = create_model(name, num_classes=2)
    return ModelFacts(tuple(stage for stage, _ in model.stage_prefixes()), int(model.min_input_size))


def list_models() -> list[str]:
    return MODELS.names()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Importing the family modules registers them.
from transfusion.models import cbr  # noqa: E402,F401

__all__ = [
    "MODEL_ALIASES",
    "CaptureModel",
    "ModelFacts",
    "canonical_model_name",
    "count_parameters",
    "create_model",
    "list_models",
    "model_facts",
    "model_key_name",
    "register_model",
]
