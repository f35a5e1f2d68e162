"""Probe activations: named representations of a fixed probe set, sampled and stored compactly.

CCA-family similarities need many more examples (rows) than features: with rows
close to the channel count two unrelated layers score near 1. A conv map is
therefore never pooled; each layer keeps ``rows_per_channel x channels`` (image,
position) rows of the *unpooled* map, spread evenly over the probe images
(``ceil(rows_per_channel * C / N)`` positions per image, all of them when an image
has fewer), every image at the same positions so that a chance level can pair each
row with the same position of another image. Which positions is a seeded function
of the layer name, the map shape and the seed only -- not of the weights -- so every
run and step of a grid (same model, resolution and probe set) stores the same rows
and pairs align row by row.

A stored probe (``step-<n>.npz``) holds, per layer ``L``:

- ``L``: (rows, channels) fp16 activations (conv layers), or (images, features)
  for flat outputs (``pool``, ``logits``); fp32 where fp16 would overflow;
- ``L.rows``: (rows, 3) int32 ``(image, h, w)`` of each conv row, sorted by image,
  so the analysis can permute whole images for chance levels;
- ``L.dtype``: only where ``L`` is stored in fp32, a note saying why: one of its
  values exceeds fp16's range (|x| > 65504), which fp16 would store as inf;

and ``sampling``: the rule as JSON, logged again with the analysis.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROWS_SUFFIX = ".rows"
# Present only for a layer stored in fp32 because a value exceeds fp16's range.
DTYPE_SUFFIX = ".dtype"
FP16_MAX = float(np.finfo(np.float16).max)
SAMPLING_KEY = "sampling"
# Layers the representation analyses compare (pool and logits are stored, not analysed).
ANALYSED_LAYER = re.compile(r"^(conv1|stage(\d+))$")
# Below this many rows per feature a CCA-family score is dominated by its chance floor
# (PAPER.md: CCA of independent data is 0.27 at 10 rows per dim, 0.64 at 2).
MIN_ROWS_PER_DIM = 10


@dataclass(frozen=True)
class ProbeSampling:
    """The rule that picks conv rows; a config value (``train.probe_rows_per_channel``, ``train.probe_seed``)."""

    rows_per_channel: int = MIN_ROWS_PER_DIM
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rows_per_channel, bool) or int(self.rows_per_channel) < 1:
            raise ValueError(f"rows_per_channel must be a positive integer; got {self.rows_per_channel!r}")
        if isinstance(self.seed, bool) or int(self.seed) < 0:
            raise ValueError(f"seed must be an integer >= 0; got {self.seed!r}")

    def describe(self) -> str:
        return (
            f"unpooled conv maps: ceil({self.rows_per_channel} x channels / images) seeded positions, the same"
            f" in every image (seed {self.seed}), the same for every run and step"
        )


def is_analysed_layer(name: str) -> bool:
    return bool(ANALYSED_LAYER.match(name))


def positions_per_image(*, images: int, height: int, width: int, channels: int, sampling: ProbeSampling) -> int:
    """Positions each image contributes: enough for ``rows_per_channel x channels`` rows, at most all."""
    return min(height * width, math.ceil(sampling.rows_per_channel * channels / images))


def sample_positions(
    layer: str, *, images: int, height: int, width: int, channels: int, sampling: ProbeSampling
) -> np.ndarray:
    """(rows, 3) int32 ``(image, h, w)``: the rows a conv layer keeps, sorted by image then position.

    Every image keeps the same seeded set of positions. Depends only on the
    arguments (not on activations), so every run with the same model, resolution
    and probe set keeps the same rows.
    """
    per_image = positions_per_image(images=images, height=height, width=width, channels=channels, sampling=sampling)
    # crc32: a stable per-layer stream (Python's hash() is salted per process).
    rng = np.random.default_rng([sampling.seed, zlib.crc32(layer.encode())])
    # One set of positions for every image: a chance pairing can then keep each row's
    # position and change only its image (transfusion.similarity.chance_level).
    chosen = np.sort(rng.choice(height * width, size=per_image, replace=False))
    flat = np.tile(chosen, images)
    image = np.repeat(np.arange(images), per_image)
    return np.stack([image, flat // width, flat % width], axis=1).astype(np.int32)


def as_channel_map(output: torch.Tensor) -> torch.Tensor:
    """Transformer tokens ``(N, T, C)`` as a ``(N, C, T, 1)`` map, so tokens are sampled as positions are."""
    return output.transpose(1, 2).unsqueeze(-1) if output.ndim == 3 else output


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    images: torch.Tensor,
    *,
    sampling: ProbeSampling | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Runs ``images`` through ``model`` in eval mode; returns the arrays of a stored probe.

    Conv outputs are sampled per :func:`sample_positions` from the unpooled map
    inside the forward hook, batch by batch, so a 587 px conv1 map of hundreds of
    images is never held whole.
    """
    sampling = sampling or ProbeSampling()
    capture = getattr(model, "capture_modules", None)
    if capture is None:
        raise TypeError(f"{type(model).__name__} does not name its layers (capture_modules)")
    total = len(images)
    outputs: dict[str, list[torch.Tensor]] = {}
    rows: dict[str, np.ndarray] = {}
    batch_start = [0]
    handles = []
    for name, module in capture().items():

        def hook(_module, _inputs, output, name=name):
            if isinstance(output, tuple):
                output = output[0]
            output = as_channel_map(output)
            if output.ndim == 4:
                if name not in rows:
                    _, c, h, w = output.shape
                    rows[name] = sample_positions(name, images=total, height=h, width=w, channels=c, sampling=sampling)
                keep = rows[name]
                start = batch_start[0]
                here = keep[(keep[:, 0] >= start) & (keep[:, 0] < start + output.shape[0])]
                index = torch.from_numpy(here.astype(np.int64)).to(output.device)
                output = output[index[:, 0] - start, :, index[:, 1], index[:, 2]]
            # fp32 until the whole layer is seen: fp16 is chosen only if every value fits.
            outputs.setdefault(name, []).append(output.detach().to("cpu", torch.float32))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, total, batch_size):
            batch_start[0] = start
            model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    probe: dict[str, np.ndarray] = {}
    for name, chunks in outputs.items():
        values = torch.cat(chunks).contiguous().numpy()
        probe[name], note = _compact(values)
        if note:
            probe[name + DTYPE_SUFFIX] = np.array(note)
    probe.update({name + ROWS_SUFFIX: positions for name, positions in rows.items()})
    probe[SAMPLING_KEY] = np.array(json.dumps(asdict(sampling)))
    return probe


def _compact(values: np.ndarray) -> tuple[np.ndarray, str]:
    """fp16 when every value fits; else fp32 and a note saying why (fp16 would store inf)."""
    largest = float(np.abs(values).max()) if values.size else 0.0
    if largest <= FP16_MAX or not np.isfinite(largest):
        return values.astype(np.float16), ""
    return values, f"float32: largest |value| {largest:.6g} exceeds fp16's {FP16_MAX:.0f}"


def stored_dtype_note(probe: dict[str, np.ndarray], layer: str) -> str:
    """Why ``layer`` is stored in fp32 rather than fp16 ('' when it is fp16)."""
    note = probe.get(layer + DTYPE_SUFFIX)
    return "" if note is None else str(note)


def save_probe(path: Path, activations: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **activations)
    return path


def load_probe(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def probe_layers(probe: dict[str, np.ndarray]) -> list[str]:
    """Names of the representations in a loaded probe (row indices and metadata left out)."""
    return [name for name in probe if name != SAMPLING_KEY and not name.endswith((ROWS_SUFFIX, DTYPE_SUFFIX))]


def image_groups(probe: dict[str, np.ndarray], layer: str) -> np.ndarray | None:
    """The probe image of each row of ``layer`` (conv rows), or None for flat layers / old probes."""
    positions = probe.get(layer + ROWS_SUFFIX)
    return None if positions is None else positions[:, 0]


def probe_sampling(probe: dict[str, np.ndarray]) -> ProbeSampling | None:
    """The sampling rule a probe was stored with (None: an old pooled probe)."""
    if SAMPLING_KEY not in probe:
        return None
    return ProbeSampling(**json.loads(str(probe[SAMPLING_KEY])))


# ------------------------------------------------------------------- planning


@dataclass(frozen=True)
class LayerPlan:
    """What a probe stores for one analysed layer, from the config alone.

    Attributes:
        layer: ``conv1``, ``stage1``, ...
        channels: Features of the representation.
        height, width: Unpooled map size at the job's resolution.
        rows: (image, position) rows kept.
        rows_per_dim: ``rows / channels``; below :data:`MIN_ROWS_PER_DIM` a value is "too few rows".
        stored_bytes: fp16 activations plus row indices, uncompressed.
    """

    layer: str
    channels: int
    height: int
    width: int
    rows: int
    rows_per_dim: float
    stored_bytes: int


def layer_shapes(model_name: str, *, resolution: int, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch) of every captured layer, on the meta device (no compute)."""
    from transfusion.models import MODELS

    with torch.device("meta"):
        model = MODELS.get(model_name)(num_classes=2, in_channels=in_channels)
    model.eval()
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:
            output = as_channel_map(output[0] if isinstance(output, tuple) else output)
            shapes.setdefault(name, tuple(output.shape[1:]))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.capture_modules().items()]
    try:
        with torch.no_grad():
            model(torch.empty(2, in_channels, resolution, resolution, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def probe_plan(
    model_name: str, *, resolution: int, probe_size: int, sampling: ProbeSampling, in_channels: int = 3
) -> list[LayerPlan]:
    """Rows, rows/dims and bytes of every analysed layer of one probe of ``model_name``."""
    plans = []
    for layer, shape in layer_shapes(model_name, resolution=resolution, in_channels=in_channels).items():
        if not is_analysed_layer(layer) or len(shape) != 3:
            continue
        c, h, w = shape
        per_image = positions_per_image(images=probe_size, height=h, width=w, channels=c, sampling=sampling)
        rows = per_image * probe_size
        plans.append(LayerPlan(layer, c, h, w, rows, rows / c, rows * c * 2 + rows * 3 * 4))
    return plans
