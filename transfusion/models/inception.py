"""Inception-v3 in torchvision's layout, with the auxiliary classifier used in training.

The model subclasses torchvision's ``Inception3`` so every module name (``Conv2d_1a_3x3``,
``Mixed_5b`` ... ``Mixed_7c``, ``AuxLogits``, ``fc``) and therefore an ``IMAGENET1K_V1``
state dict matches. ``transform_input`` is off: inputs are normalised by the data
pipeline with the pretrained source's own statistics (the Google weights expect
``(x - 0.5) / 0.5``; see :mod:`transfusion.pretrained`).

Captured stages (sizes at 299 px):

=========  =====================================  ==========
name       module (output of)                     map
=========  =====================================  ==========
conv1      ``Conv2d_1a_3x3``                       32 x 149
stage1     ``maxpool2`` (after ``Conv2d_4a_3x3``)  192 x 35
stage2     ``Mixed_5d``                            288 x 35
stage3     ``Mixed_6e``                            768 x 17
stage4     ``Mixed_7c``                            2048 x 8
pool       ``avgpool`` (flattened)                 2048
logits     ``fc``                                  classes
=========  =====================================  ==========

The auxiliary head reads ``Mixed_6e``; its 5x5 average pool (stride 3) then 5x5 valid
conv need a 17x17 map, i.e. an input of at least 299 px. Below that
:meth:`InceptionV3.forward_with_aux` returns no aux logits (and logs so once). The main
path needs at least 75 px.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision.models.inception import BasicConv2d, Inception3

from transfusion.constants import INCEPTION_MEAN, INCEPTION_STD
from transfusion.models import register_model
from transfusion.models.base import CaptureModel

logger = logging.getLogger(__name__)

# Smallest ``Mixed_6e`` map the auxiliary head accepts (avg-pool 5/3 -> 5x5 conv).
AUX_MIN_MAP = 17
AUX_WEIGHT = 0.4  # torchvision's reference training: loss = main + 0.4 * aux


def _trunc_normal_init(module: nn.Module) -> None:
    """torchvision's Inception init: truncated normal, std from ``module.stddev`` or 0.1."""
    stddev = float(getattr(module, "stddev", 0.1))
    nn.init.trunc_normal_(module.weight, mean=0.0, std=stddev, a=-2, b=2)


class InceptionV3(CaptureModel, Inception3):
    """torchvision Inception-v3 as a :class:`CaptureModel`.

    ``forward`` always returns the main logits only. Training code that wants the
    auxiliary loss calls :meth:`forward_with_aux` and adds ``AUX_WEIGHT * aux_loss``
    (0.4, as torchvision's reference script does) when the aux logits are not ``None``.
    """

    input_mean = INCEPTION_MEAN
    input_std = INCEPTION_STD

    classifier_name = "fc"
    min_input_size = 75
    default_resolution = 299
    aux_min_input_size = 299

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        aux_logits: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            aux_logits=aux_logits,
            transform_input=False,
            init_weights=True,
            dropout=dropout,
        )
        if in_channels != 3:
            # Same position in the module order, so state-dict keys keep their order.
            self.Conv2d_1a_3x3 = BasicConv2d(in_channels, 32, kernel_size=3, stride=2)
            _trunc_normal_init(self.Conv2d_1a_3x3.conv)
        # Flatten inside the pool module so the captured ``pool`` is the classifier input.
        self.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self._warned_no_aux = False

    def init_weights(self) -> None:
        """Redraws weights as torchvision's constructor does (``init_weights=True``)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                _trunc_normal_init(module)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    def classifier_prefixes(self) -> tuple[str, ...]:
        if self.AuxLogits is None:
            return ("fc.",)
        return ("fc.", "AuxLogits.fc.")

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        if self.AuxLogits is not None:
            self.AuxLogits.fc = nn.Linear(self.AuxLogits.fc.in_features, num_classes)

    def _to_mixed_6e(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = self.maxpool1(x)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = self.maxpool2(x)
        x = self.Mixed_5b(x)
        x = self.Mixed_5c(x)
        x = self.Mixed_5d(x)
        x = self.Mixed_6a(x)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        return self.Mixed_6e(x)

    def _from_mixed_6e(self, x: torch.Tensor) -> torch.Tensor:
        return self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.avgpool(features)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._from_mixed_6e(self._to_mixed_6e(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Main logits and, in training mode, the auxiliary logits.

        The aux logits are ``None`` in eval mode, without an aux head, or when the input
        is smaller than ``aux_min_input_size`` (299 px; the aux head's pooling and 5x5
        conv need a 17x17 ``Mixed_6e`` map).
        """
        mixed_6e = self._to_mixed_6e(x)
        aux = None
        if self.training and self.AuxLogits is not None:
            if min(mixed_6e.shape[-2:]) >= AUX_MIN_MAP:
                aux = self.AuxLogits(mixed_6e)
            elif not self._warned_no_aux:
                logger.warning(
                    "Inception-v3 aux logits skipped: input %s px is below %d px (aux head needs a "
                    "%dx%d Mixed_6e map); training uses the main loss only",
                    tuple(x.shape[-2:]),
                    self.aux_min_input_size,
                    AUX_MIN_MAP,
                    AUX_MIN_MAP,
                )
                self._warned_no_aux = True
        return self._head(self._from_mixed_6e(mixed_6e)), aux

    def capture_modules(self) -> dict[str, nn.Module]:
        return {
            "conv1": self.Conv2d_1a_3x3,
            "stage1": self.maxpool2,
            "stage2": self.Mixed_5d,
            "stage3": self.Mixed_6e,
            "stage4": self.Mixed_7c,
            "pool": self.avgpool,
            "logits": self.fc,
        }

    def stage_prefixes(self) -> list[tuple[str, tuple[str, ...]]]:
        # The aux head belongs to no stage: transfusion(k) leaves it random.
        return [
            ("conv1", ("Conv2d_1a_3x3.",)),
            ("stage1", ("Conv2d_2a_3x3.", "Conv2d_2b_3x3.", "Conv2d_3b_1x1.", "Conv2d_4a_3x3.")),
            ("stage2", ("Mixed_5b.", "Mixed_5c.", "Mixed_5d.")),
            ("stage3", ("Mixed_6a.", "Mixed_6b.", "Mixed_6c.", "Mixed_6d.", "Mixed_6e.")),
            ("stage4", ("Mixed_7a.", "Mixed_7b.", "Mixed_7c.")),
        ]


@register_model("inception-v3")
def inception_v3(*, num_classes: int, in_channels: int = 3) -> InceptionV3:
    """Inception-v3 (torchvision layout, fits ``IMAGENET1K_V1``) with aux logits."""
    return InceptionV3(num_classes=num_classes, in_channels=in_channels)
