"""Probe activations: named representations of a fixed probe set, stored compactly.

Conv maps (N, C, H, W) are average-pooled to at most ``spatial x spatial`` positions so
the analysis can still treat positions as examples, and everything is stored fp16:
a ResNet-50 probe of 128 images costs a few MB, not GBs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    images: torch.Tensor,
    *,
    spatial: int = 4,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Runs ``images`` through ``model`` in eval mode; returns ``layer -> fp16 array``."""
    capture = getattr(model, "capture_modules", None)
    if capture is None:
        raise TypeError(f"{type(model).__name__} does not name its layers (capture_modules)")
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in capture().items():

        def hook(_module, _inputs, output, name=name):
            if isinstance(output, tuple):
                output = output[0]
            if output.ndim == 4 and (output.shape[-1] > spatial or output.shape[-2] > spatial):
                output = F.adaptive_avg_pool2d(output, (min(spatial, output.shape[-2]), min(spatial, output.shape[-1])))
            outputs.setdefault(name, []).append(output.detach().to("cpu", torch.float16))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(chunks).contiguous().numpy() for name, chunks in outputs.items()}


def save_probe(path: Path, activations: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **activations)
    return path


def load_probe(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
