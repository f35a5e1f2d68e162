"""Modern architectures from timm: ConvNeXt-Tiny, ViT-S/16 and EfficientNet-B0.

Each wraps the timm module as ``net`` (state-dict keys are timm's under ``net.``; the
``timm`` key layout of :mod:`transfusion.pretrained` adds the prefix to a timm
checkpoint). Stages are timm's own feature-info entries (``stages.i`` of ConvNeXt,
``blocks.i`` of ViT, the stride changes of EfficientNet), so ``stage1..K`` and
weight transfusion(k) follow the architecture's published structure rather than a
split of our choosing.

ViT blocks output tokens ``(N, T, C)``; the probes sample ``(image, token)`` rows of
them as they sample ``(image, position)`` rows of conv maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from transfusion.models import register_model
from transfusion.models.base import CaptureModel


def _module_name(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


class TimmModel(CaptureModel):
    """A timm classifier under uniform capture names.

    Captures ``conv1`` (the stem), ``stage1..K`` (timm's feature-info modules),
    ``pool`` (pre-logits features, the classifier input) and ``logits``.

    Subclasses set ``timm_name`` and implement :meth:`_stem_prefixes`,
    :meth:`_stem_module` and :meth:`_pool_module`.
    """

    timm_name: str = ""
    min_input_size = 32
    default_resolution = 224
    extra_timm_args: dict = {}

    def __init__(self, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self._build_args = {"num_classes": num_classes, "in_chans": in_channels, **self.extra_timm_args}
        self.net = _create_timm(self.timm_name, **self._build_args)
        cfg = self.net.pretrained_cfg
        self.input_mean = tuple(float(v) for v in cfg.get("mean", self.input_mean))
        self.input_std = tuple(float(v) for v in cfg.get("std", self.input_std))
        self._feature_modules = [info["module"] for info in self.net.feature_info]

    # -- what the analyses and inits see ------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def capture_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"conv1": self._stem_module()}
        for i, name in enumerate(self._feature_modules, start=1):
            modules[f"stage{i}"] = self.net.get_submodule(name)
        # The last stage ends where its prefixes end: forward_features' output.
        modules[f"stage{len(self._feature_modules)}"] = self._last_stage_module()
        modules["pool"] = self._pool_module()
        modules["logits"] = self.get_classifier()
        return modules

    def stage_prefixes(self) -> list[tuple[str, tuple[str, ...]]]:
        """conv1, then each feature-info module with what lies between it and the previous one.

        Modules after the last feature module (a final norm, EfficientNet's head conv) join
        the last stage; the classifier belongs to none.
        """
        stem = self._stem_prefixes()
        classifier = self._classifier_name() + "."
        features = [f"{name}." for name in self._feature_modules]
        stages: list[dict[str, None]] = [{} for _ in features]
        closed = -1  # index of the last feature module seen so far
        for key in self.net.state_dict():
            if key.startswith(stem) or key.startswith(classifier):
                continue
            owner = next((i for i, prefix in enumerate(features) if key.startswith(prefix)), None)
            if owner is not None:
                stages[owner][features[owner]] = None
                closed = owner
            else:
                module = _container_prefix(key)
                stages[min(closed + 1, len(features) - 1)][module] = None
        result = [("conv1", tuple(f"net.{p}" for p in stem))]
        result += [(f"stage{i}", tuple(f"net.{p}" for p in keys)) for i, keys in enumerate(stages, start=1)]
        return result

    def classifier_prefixes(self) -> tuple[str, ...]:
        return (f"net.{self._classifier_name()}.",)

    def _classifier_name(self) -> str:
        return _module_name(self.net, self.net.get_classifier())

    def get_classifier(self) -> nn.Linear:
        return self.net.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        self.net.reset_classifier(num_classes)

    def init_weights(self) -> None:
        """timm's own init for the architecture: a fresh module's weights (from the current RNG)."""
        fresh = _create_timm(self.timm_name, **self._build_args)
        with torch.no_grad():
            self.net.load_state_dict(fresh.state_dict())

    # -- per architecture ---------------------------------------------------------------

    def _stem_prefixes(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _stem_module(self) -> nn.Module:
        raise NotImplementedError

    def _pool_module(self) -> nn.Module:
        raise NotImplementedError

    def _last_stage_module(self) -> nn.Module:
        return self.net.get_submodule(self._feature_modules[-1])


def _container_prefix(key: str) -> str:
    """``blocks.3.1.conv.weight`` -> ``blocks.3.``; ``head.norm.weight`` -> ``head.norm.``."""
    parts = key.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}."
    return key.rsplit(".", 1)[0] + "." if "." in key else key


def _create_timm(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


class ConvNeXtTiny(TimmModel):
    """ConvNeXt-Tiny (Liu et al. 2022), 28.6 M parameters with a 1 000-way head."""

    timm_name = "convnext_tiny"

    def _stem_prefixes(self) -> tuple[str, ...]:
        return ("stem.",)

    def _stem_module(self) -> nn.Module:
        return self.net.stem

    def _pool_module(self) -> nn.Module:
        return self.net.head.pre_logits  # identity after pool, norm and flatten: the fc input


class ViTSmall16(TimmModel):
    """ViT-S/16 (Dosovitskiy et al. 2021; AugReg weights), 22.1 M parameters with a 1 000-way head.

    Built with a dynamic image size: the position embedding is interpolated to the
    grid of any input side divisible by 16.
    """

    timm_name = "vit_small_patch16_224"
    min_input_size = 16
    extra_timm_args = {"dynamic_img_size": True}

    def _stem_prefixes(self) -> tuple[str, ...]:
        return ("patch_embed.", "cls_token", "pos_embed")

    def _stem_module(self) -> nn.Module:
        return self.net.norm_pre  # patch embeddings with position added, cls token included

    def _pool_module(self) -> nn.Module:
        return self.net.head_drop  # the class token after the final norm: the head's input

    def _last_stage_module(self) -> nn.Module:
        return self.net.norm  # the last block's tokens after the final norm


class EfficientNetB0(TimmModel):
    """EfficientNet-B0 (Tan & Le 2019), 5.3 M parameters with a 1 000-way head."""

    timm_name = "efficientnet_b0"

    def _stem_prefixes(self) -> tuple[str, ...]:
        return ("conv_stem.", "bn1.")

    def _stem_module(self) -> nn.Module:
        return self.net.bn1  # batch norm with its activation

    def _pool_module(self) -> nn.Module:
        return self.net.global_pool

    def _last_stage_module(self) -> nn.Module:
        return self.net.bn2  # the 1 280-channel head conv closes the last stage


def _builder(cls: type[TimmModel]) -> Callable[..., TimmModel]:
    def build(*, num_classes: int, in_channels: int = 3) -> TimmModel:
        return cls(num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = cls.__doc__
    return build


TIMM_MODELS = {"convnext-tiny": ConvNeXtTiny, "vit-small-patch16-224": ViTSmall16, "efficientnet-b0": EfficientNetB0}
for _name, _cls in TIMM_MODELS.items():
    register_model(_name)(_builder(_cls))
