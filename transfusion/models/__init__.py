"""Model registry: every model of the paper, built by name.

Every model is a :class:`CaptureModel`: it names the representations the analysis
compares the same way (``conv1``, ``stage1`` ... ``stageK``, ``pool``, ``logits``),
exposes ``forward_features`` (the map before global pooling) and a resettable head.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from transfusion.models.base import CaptureModel
from transfusion.registry import Registry

MODELS: Registry[Callable[..., CaptureModel]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[..., CaptureModel]], Callable[..., CaptureModel]]:
    return MODELS.register(name)


def create_model(name: str, *, num_classes: int, in_channels: int = 3) -> CaptureModel:
    """Builds the model ``name`` with ``num_classes`` logits for ``in_channels`` input."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


def list_models() -> list[str]:
    return MODELS.names()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Importing the family modules registers them.
from transfusion.models import cbr, inception, resnet  # noqa: E402,F401

__all__ = ["CaptureModel", "count_parameters", "create_model", "list_models", "register_model"]
