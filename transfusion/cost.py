"""What a model costs: parameters and an estimate of training FLOPs."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def forward_flops(model: nn.Module, *, in_channels: int, resolution: int) -> int:
    """Multiply-adds x 2 of one forward pass on one image (convolutions, linears and attention).

    A linear applied per token counts once per token; attention (timm's ``Attention``,
    any module with ``num_heads`` and ``head_dim``) adds its two token-by-token products.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_position = (module.in_channels // module.groups) * kh * kw * module.out_channels
        total += 2 * per_position * output.shape[-1] * output.shape[-2]

    def linear_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        rows = output.numel() // output.shape[-1]  # one image: 1, or its tokens
        total += 2 * module.in_features * module.out_features * rows

    def attention_hook(module: nn.Module, inputs, _output) -> None:
        nonlocal total
        tokens = inputs[0].shape[-2]
        total += 2 * 2 * tokens * tokens * module.num_heads * module.head_dim  # q @ k^T, then @ v

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif hasattr(m, "num_heads") and hasattr(m, "head_dim"):
            handles.append(m.register_forward_hook(attention_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_channels, resolution, resolution, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def training_flops(forward: int, *, steps: int, batch_size: int) -> float:
    """Forward + backward is about three forward passes per image."""
    return 3.0 * forward * steps * batch_size
