"""The paper's small CBR nets: blocks of conv -> batch-norm -> ReLU (-> max-pool).

Convolutions are stride 1 with SAME padding and no bias (batch-norm follows); max-pool
is 3x3 stride 2; a global average pool and one linear layer close the net.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transfusion.models import register_model
from transfusion.models.base import CaptureModel


@dataclass(frozen=True)
class CBRArch:
    kernel_size: int
    widths: tuple[int, ...]
    pool_after: tuple[bool, ...]


# One row per family member (PAPER.md, Models). CBR-Tiny widths are our reading of
# Table 1's parameter count; the appendix text is quoted with doubled widths.
CBR_ARCHS: dict[str, CBRArch] = {
    "cbr-large-tall": CBRArch(7, (32, 64, 128, 256, 512), (True, True, True, True, False)),
    "cbr-large-wide": CBRArch(7, (64, 128, 256, 512), (True, True, True, True)),
    "cbr-small": CBRArch(7, (32, 64, 128, 256), (True, True, True, True)),
    "cbr-tiny": CBRArch(5, (32, 64, 128, 256), (True, True, True, True)),
}


class CBRBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, pool: bool) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        super().__init__(*layers)


class CBRNet(CaptureModel):
    default_resolution = 224

    def __init__(self, arch: CBRArch, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.arch = arch
        self.min_input_size = 2 ** sum(arch.pool_after)
        channels = (in_channels, *arch.widths)
        self.conv1 = CBRBlock(channels[0], channels[1], arch.kernel_size, arch.pool_after[0])
        self.stage_names = [f"stage{i}" for i in range(1, len(arch.widths))]
        for i, name in enumerate(self.stage_names, start=1):
            block = CBRBlock(channels[i], channels[i + 1], arch.kernel_size, arch.pool_after[i])
            setattr(self, name, block)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(arch.widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init, the framework default the paper calls "random".
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.forward_features(x)))

    def capture_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"conv1": self.conv1}
        modules.update({name: getattr(self, name) for name in self.stage_names})
        modules["pool"] = self.pool
        modules["logits"] = self.fc
        return modules

    def stage_prefixes(self) -> list[tuple[str, tuple[str, ...]]]:
        return [("conv1", ("conv1.",))] + [(name, (f"{name}.",)) for name in self.stage_names]


def _register(name: str, arch: CBRArch) -> None:
    def build(*, num_classes: int, in_channels: int = 3) -> CBRNet:
        return CBRNet(arch, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = name.replace("-", "_")
    register_model(name)(build)


for _name, _arch in CBR_ARCHS.items():
    _register(_name, _arch)
