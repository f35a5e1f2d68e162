"""The interface every registered model offers to training, inits and analysis."""

from __future__ import annotations

import torch
from torch import nn

from transfusion.constants import IMAGENET_MEAN, IMAGENET_STD


class CaptureModel(nn.Module):
    """A classifier whose representations have uniform names.

    Subclasses set ``classifier_name`` (attribute name of the final linear layer),
    ``min_input_size`` (smallest valid square input), ``default_resolution`` and
    implement :meth:`capture_modules` and :meth:`stage_prefixes`.
    """

    classifier_name: str = "fc"
    # Input normalisation the architecture's pretrained weights expect (ImageNet
    # statistics; TF-Slim Inception weights want [-1, 1]).
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    min_input_size: int = 32
    default_resolution: int = 224

    def capture_modules(self) -> dict[str, nn.Module]:
        """Ordered ``name -> module`` whose outputs are the named representations.

        Names run ``conv1``, ``stage1`` ... ``stageK``, ``pool`` (pooled features,
        the classifier input) and ``logits``.
        """
        raise NotImplementedError

    def stage_prefixes(self) -> list[tuple[str, tuple[str, ...]]]:
        """State-dict prefixes of each stage in forward order, ``conv1`` first.

        Weight transfusion(k) copies the prefixes of ``conv1`` and ``stage1..k``.
        """
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classifier_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of every classifier head (main, and auxiliary if any).

        Inits never take these from a source of another task, and Mean-Var leaves them random.
        """
        return (f"{self.classifier_name}.",)

    def init_weights(self) -> None:
        """Draws fresh random weights the way the family's constructor does.

        The default is the framework init the paper calls random: He-normal (fan-out)
        convolutions, batch-norm at identity with fresh running statistics, and
        PyTorch's default for linear layers. Families with another init override it.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear)):
                module.reset_parameters()

    def get_classifier(self) -> nn.Linear:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        old = self.get_classifier()
        setattr(self, self.classifier_name, nn.Linear(old.in_features, num_classes))
