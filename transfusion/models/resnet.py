"""ResNet-50 (torchvision layout) and the paper's slim ResNet-50.

Module names are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``)
so a torchvision ``IMAGENET1K_V1`` state dict loads key for key. The stem conv takes
1 or 3 input channels; for a 1-channel model the weight-transfer inits
(:mod:`transfusion.inits`) sum the pretrained RGB filters over the input-channel axis,
which is what a grey image replicated to three channels would see.

The slim ResNet keeps the stem and stages ``1..k`` at ResNet-50 widths (so pretrained
weights fit them: weight transfusion(k)) and narrows the later stages by a width factor;
those are random. The paper's slim model is "pretrained weights up to block 2".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

from transfusion.models import register_model
from transfusion.models.base import CaptureModel


@dataclass(frozen=True)
class ResNetArch:
    """Bottleneck blocks per stage and each stage's bottleneck width (outputs are 4x)."""

    blocks: tuple[int, ...]
    planes: tuple[int, ...]


# torchvision `_resnet(Bottleneck, [3, 4, 6, 3], ...)`.
RESNET50 = ResNetArch(blocks=(3, 4, 6, 3), planes=(64, 128, 256, 512))

STEM_WIDTH = 64


def slim_arch(base: ResNetArch, *, k: int, width_factor: float) -> ResNetArch:
    """``base`` with stages after ``k`` narrowed by ``width_factor`` (stages count from 1)."""
    num_stages = len(base.planes)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= num_stages:
        raise ValueError(f"slim ResNet k must be an int in 0..{num_stages}, got {k!r}")
    if not width_factor > 0:
        raise ValueError(f"slim ResNet width_factor must be > 0, got {width_factor!r}")
    planes = tuple(p if stage <= k else max(1, round(p * width_factor)) for stage, p in enumerate(base.planes, start=1))
    return ResNetArch(blocks=base.blocks, planes=planes)


def _make_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """torchvision's ``ResNet._make_layer`` for bottlenecks, with explicit widths."""
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or inplanes != out_channels:
        downsample = nn.Sequential(conv1x1(inplanes, out_channels, stride), nn.BatchNorm2d(out_channels))
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(out_channels, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(CaptureModel):
    """A bottleneck ResNet with torchvision module names.

    Captures: ``conv1`` (stem after ReLU, before max-pool), ``stage1..4``
    (``layer1..4``), ``pool`` (pooled features, the classifier input), ``logits``.
    """

    classifier_name = "fc"
    # Output stride 32: the last feature map is 1x1 at 32 px.
    min_input_size = 32
    default_resolution = 224

    def __init__(self, arch: ResNetArch, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.arch = arch
        self.conv1 = nn.Conv2d(in_channels, STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_names = [f"stage{i}" for i in range(1, len(arch.planes) + 1)]
        inplanes = STEM_WIDTH
        for i, (planes, blocks) in enumerate(zip(arch.planes, arch.blocks, strict=True), start=1):
            setattr(self, f"layer{i}", _make_stage(inplanes, planes, blocks, stride=1 if i == 1 else 2))
            inplanes = planes * Bottleneck.expansion
        # Flatten inside the pool module so the captured ``pool`` is the classifier input.
        self.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(inplanes, num_classes)
        self.init_weights()

    def _layers(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i}") for i in range(1, len(self.stage_names) + 1)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in self._layers():
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.forward_features(x)))

    def capture_modules(self) -> dict[str, nn.Module]:
        # The stem ReLU is used only in the stem, so its output is the stem output.
        modules: dict[str, nn.Module] = {"conv1": self.relu}
        modules.update(zip(self.stage_names, self._layers(), strict=True))
        modules["pool"] = self.avgpool
        modules["logits"] = self.fc
        return modules

    def stage_prefixes(self) -> list[tuple[str, tuple[str, ...]]]:
        stages = [(name, (f"layer{i}.",)) for i, name in enumerate(self.stage_names, start=1)]
        return [("conv1", ("conv1.", "bn1."))] + stages


@register_model("resnet50")
def resnet50(*, num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-50 in torchvision's layout (fits ``IMAGENET1K_V1``)."""
    return ResNet(RESNET50, num_classes=num_classes, in_channels=in_channels)


@register_model("slim-resnet50")
def slim_resnet50(*, num_classes: int, in_channels: int = 3, k: int = 2, width_factor: float = 0.5) -> ResNet:
    """ResNet-50 with stem and stages ``1..k`` at full width, later stages narrowed.

    Args:
        num_classes: Logits of the classifier.
        in_channels: 1 or 3.
        k: Last stage kept at ResNet-50 width (0 keeps only the stem); these take
            pretrained weights via weight transfusion(k). The paper: "up to block 2".
        width_factor: Multiplier on the bottleneck widths of stages after ``k``.
    """
    arch = slim_arch(RESNET50, k=k, width_factor=width_factor)
    return ResNet(arch, num_classes=num_classes, in_channels=in_channels)
