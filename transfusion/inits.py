"""The paper's initialisations, applied to a built model by name.

==============  ============================================================  =======
name            what it does                                                  source
==============  ============================================================  =======
random          the family's framework init (He for convs); redrawn if seeded  no
imagenet        every tensor copied; a classifier of another shape skipped     yes
mean-var        each weight drawn i.i.d. from N(mean, std^2) of the source     yes
                tensor; batch-norm at identity; classifier random
transfusion     conv1 and stage1..k copied (option ``k``), the rest random     yes
gabor           conv1's conv weight set to a synthetic Gabor bank, rest random no
==============  ============================================================  =======

A *source* is a state dict of the same architecture (or a :class:`LoadedWeights`, a
registered pretrained-source name, or a URI; see :mod:`transfusion.pretrained`).
Weight surgery checks every tensor name and shape it relies on and raises
``ValueError`` naming the offending keys; classifier tensors that do not fit are
skipped and logged. A 3-channel source's stem filters are summed over the RGB axis
for a 1-channel model. ``num_batches_tracked`` counters are never copied nor checked
(older checkpoints lack them). With ``seed`` set, the random part of every init is
redrawn under that seed first, so (init, source, seed) fixes the weights.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from transfusion.models.base import CaptureModel
from transfusion.pretrained import (
    PRETRAINED,
    LoadedWeights,
    apply_layout,
    load_pretrained,
    load_state_dict_from_uri,
    source_for,
)
from transfusion.registry import Registry

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
Source = StateDict | LoadedWeights | nn.Module | str

_COUNTER_SUFFIX = "num_batches_tracked"
_MAX_KEYS_SHOWN = 5
# Mean-Var sets these to identity. Layer and group norms (ConvNeXt, ViT) follow the
# paper's batch-norm rule: identity rather than draws around their pretrained values.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class InitReport:
    """What an init did to each state-dict tensor; unlisted tensors are random.

    Attributes:
        init: Init name.
        copied: Keys copied from the source.
        sampled: Keys drawn from the source tensor's statistics (Mean-Var).
        fixed: Keys set to a fixed value (batch-norm identity, Gabor bank).
        skipped: Classifier keys not taken from the source (left random).
        seed: Seed the random part was redrawn with, ``None`` if left as built.
    """

    init: str
    copied: tuple[str, ...] = ()
    sampled: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    seed: int | None = None


class InitFn(Protocol):
    def __call__(
        self, model: CaptureModel, *, source: StateDict | None, seed: int | None, **options: object
    ) -> InitReport: ...


INITS: Registry[InitFn] = Registry("init")


def list_inits() -> list[str]:
    return INITS.names()


def initialize(
    model: CaptureModel,
    name: str,
    *,
    source: Source | None = None,
    seed: int | None = None,
    **options: object,
) -> CaptureModel:
    """Initialises ``model`` in place with the init ``name`` and returns it.

    Args:
        model: A registered model.
        name: One of :func:`list_inits`.
        source: Pretrained weights of the same architecture: a state dict, a
            :class:`LoadedWeights`, a module, a registered pretrained-source name or a URI.
            Required by ``imagenet``, ``mean-var`` and ``transfusion``.
        seed: Redraws the random part under this seed (and seeds Mean-Var and the
            Gabor bank); ``None`` keeps the weights the model was built with.
        **options: Init options, e.g. ``k`` for ``transfusion``.

    Raises:
        ValueError: Unknown init or option, a missing source, or a source whose keys or
            shapes do not fit the model.
    """
    return initialize_with_report(model, name, source=source, seed=seed, **options)[0]


def initialize_with_report(
    model: CaptureModel,
    name: str,
    *,
    source: Source | None = None,
    seed: int | None = None,
    **options: object,
) -> tuple[CaptureModel, InitReport]:
    """Like :func:`initialize`, also returning what was copied, sampled, fixed and skipped."""
    init_fn = INITS.get(name)
    _check_options(name, init_fn, options)
    state = _as_state_dict(source) if source is not None else None
    if state is not None and init_fn is not INITS.get("random"):
        registered = source_for(source) if isinstance(source, str) else None
        state, _ = apply_layout(state, model.state_dict(), layout=registered.layout if registered else "auto")
    if seed is not None:
        with _seeded(seed, model):
            model.init_weights()
    report = init_fn(model, source=state, seed=seed, **options)
    return model, report


# --- registered inits -------------------------------------------------------------


@INITS.register("random")
def random_init(model: CaptureModel, *, source: StateDict | None, seed: int | None) -> InitReport:
    """The framework default; :func:`initialize` has already redrawn it if seeded."""
    if source is not None:
        logger.info("init 'random' ignores its source")
    return InitReport("random", seed=seed)


@INITS.register("imagenet")
def imagenet_init(model: CaptureModel, *, source: StateDict | None, seed: int | None) -> InitReport:
    """Copies every tensor from the source; classifier tensors of another shape stay random.

    A classifier of the same shape (a source trained on the same task) is copied too.
    """
    src = _require_source(model, source, "imagenet")
    target = model.state_dict()
    classifier = _classifier_keys(model, target, src)
    _check_fits(model, target, src, in_scope=lambda key: key not in classifier, init="imagenet")
    copy_keys = [k for k in target if not _is_counter(k) and k not in classifier]
    skipped = []
    for key in sorted(classifier):
        if key in target and key in src and target[key].shape == src[key].shape:
            copy_keys.append(key)
        elif key in target:
            skipped.append(key)
    _log_skipped_classifier("imagenet", target, src, skipped)
    _copy(target, src, copy_keys)
    return InitReport("imagenet", copied=tuple(copy_keys), skipped=tuple(skipped), seed=seed)


@INITS.register("mean-var")
def mean_var_init(model: CaptureModel, *, source: StateDict | None, seed: int | None) -> InitReport:
    """Draws each weight i.i.d. from N(mean, std^2) of its source tensor; batch-norm at identity.

    Batch-norm (and layer/group norm) gets weight 1, bias 0, running mean 0 and running variance 1 (identity
    beat resampling or copying it in the paper); the classifier stays random.
    """
    src = _require_source(model, source, "mean-var")
    target = model.state_dict()
    classifier = _classifier_keys(model, target, src)
    _check_fits(model, target, src, in_scope=lambda key: key not in classifier, init="mean-var")
    batch_norm = _batch_norm_keys(model)
    # A stream of its own, so it is not the one that redrew the random part.
    generator = torch.Generator().manual_seed(_derived_seed(seed, "mean-var")) if seed is not None else None
    sampled, fixed = [], []
    with torch.no_grad():
        for key, tensor in target.items():
            if _is_counter(key) or key in classifier:
                continue
            if key in batch_norm:
                fill = 1.0 if key.endswith(("weight", "running_var")) else 0.0
                tensor.fill_(fill)
                fixed.append(key)
                continue
            reference = src[key].detach().to(torch.float64)
            # Population std: a one-element tensor gets std 0, not NaN.
            draw = torch.empty(tensor.shape, dtype=torch.float64).normal_(
                reference.mean().item(), reference.std(correction=0).item(), generator=generator
            )
            tensor.copy_(draw.to(dtype=tensor.dtype, device=tensor.device))
            sampled.append(key)
    skipped = sorted(key for key in classifier if key in target)
    return InitReport("mean-var", sampled=tuple(sampled), fixed=tuple(fixed), skipped=tuple(skipped), seed=seed)


@INITS.register("transfusion")
def transfusion_init(model: CaptureModel, *, source: StateDict | None, seed: int | None, k: int) -> InitReport:
    """Weight transfusion(k): copies conv1 and stage1..k from the source, the rest random.

    ``k=0`` copies conv1 only. Only the copied keys must fit the source, so a slim
    model takes its full-width prefix from a full-width source.
    """
    _check_transfusion_k(k, [stage for stage, _ in model.stage_prefixes()])
    src = _require_source(model, source, "transfusion")
    target = model.state_dict()
    prefixes = transfer_prefix(model, k)
    _check_fits(
        model,
        target,
        src,
        in_scope=lambda key: key.startswith(prefixes),
        init=f"transfusion(k={k})",
    )
    copy_keys = [key for key in target if key.startswith(prefixes) and not _is_counter(key)]
    _copy(target, src, copy_keys)
    return InitReport("transfusion", copied=tuple(copy_keys), seed=seed)


@INITS.register("gabor")
def gabor_init(model: CaptureModel, *, source: StateDict | None, seed: int | None) -> InitReport:
    """Sets conv1's conv weight to :func:`gabor_bank` (seeded by ``seed``, default 0)."""
    if source is not None:
        logger.info("init 'gabor' ignores its source")
    key = stem_conv_key(model)
    weight = model.state_dict()[key]
    out_channels, in_channels, *kernel = weight.shape
    bank = gabor_bank(out_channels, in_channels, tuple(kernel), seed=0 if seed is None else seed)
    with torch.no_grad():
        weight.copy_(bank.to(dtype=weight.dtype, device=weight.device))
    return InitReport("gabor", fixed=(key,), seed=seed)


# --- Gabor bank ----------------------------------------------------------------------

# Bank layout: orientations x wavelengths x phases, cycled over output channels in a
# seeded order, with a seeded orientation jitter so repeated cells differ.
GABOR_ORIENTATIONS = 8
GABOR_WAVELENGTHS = 3  # geometric from 2 px (Nyquist) to the kernel size
GABOR_PHASES = (0.0, math.pi / 2)  # even and odd filters
GABOR_SIGMA_PER_WAVELENGTH = 0.56  # ~1 octave bandwidth, as in V1 cells
GABOR_ASPECT = 0.5  # envelope elongated along the stripes


def gabor_bank(
    out_channels: int, in_channels: int, kernel_size: int | tuple[int, int], *, seed: int = 0
) -> torch.Tensor:
    """A synthetic Gabor filter bank shaped like a conv weight.

    Each output channel gets one Gabor (orientation, wavelength, phase), the same on
    every input channel (luminance filters), made zero-mean and scaled to the expected
    norm of a He-normal (fan-in) filter, sqrt(2), so activations keep their scale.

    Args:
        out_channels: Filters in the bank.
        in_channels: Input channels of each filter.
        kernel_size: Side, or (height, width), of each filter.
        seed: Picks the order of the cells and the orientation jitter.

    Returns:
        Float32 tensor ``(out_channels, in_channels, height, width)``.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if min(out_channels, in_channels, kh, kw) < 1:
        raise ValueError(f"gabor_bank needs positive sizes, got {(out_channels, in_channels, kh, kw)}")
    generator = torch.Generator().manual_seed(seed)
    size = max(kh, kw)
    wavelengths = torch.logspace(math.log10(2.0), math.log10(max(size, 2.0)), GABOR_WAVELENGTHS, dtype=torch.float64)
    cells = [
        (math.pi * o / GABOR_ORIENTATIONS, float(w), p)
        for o in range(GABOR_ORIENTATIONS)
        for w in wavelengths
        for p in GABOR_PHASES
    ]
    order = torch.randperm(len(cells), generator=generator)
    jitter = (torch.rand(out_channels, generator=generator, dtype=torch.float64) - 0.5) * (math.pi / GABOR_ORIENTATIONS)
    y = torch.arange(kh, dtype=torch.float64) - (kh - 1) / 2
    x = torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    filters = []
    for c in range(out_channels):
        theta, wavelength, phase = cells[int(order[c % len(cells)])]
        theta += float(jitter[c])
        sigma = min(GABOR_SIGMA_PER_WAVELENGTH * wavelength, size / 2)
        x_rot = xx * math.cos(theta) + yy * math.sin(theta)
        y_rot = -xx * math.sin(theta) + yy * math.cos(theta)
        envelope = torch.exp(-(x_rot**2 + (GABOR_ASPECT * y_rot) ** 2) / (2 * sigma**2))
        filters.append(envelope * torch.cos(2 * math.pi * x_rot / wavelength + phase))
    bank = torch.stack(filters).unsqueeze(1).expand(out_channels, in_channels, kh, kw).clone()
    bank -= bank.mean(dim=(1, 2, 3), keepdim=True)
    norms = bank.flatten(1).norm(dim=1).clamp_min(1e-12)
    bank *= math.sqrt(2.0) / norms.view(-1, 1, 1, 1)
    return bank.to(torch.float32)


# --- surgery helpers -----------------------------------------------------------------


def transfer_prefix(model: CaptureModel, k: int) -> tuple[str, ...]:
    """State-dict prefixes of conv1 and stage1..k, the part weight transfusion(k) copies."""
    return tuple(prefix for _, prefixes in model.stage_prefixes()[: k + 1] for prefix in prefixes)


def stem_conv_key(model: CaptureModel) -> str:
    """State-dict key of the first convolution weight under conv1's prefixes."""
    stem = model.stage_prefixes()[0][1]
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and f"{name}.".startswith(stem):
            return f"{name}.weight"
    raise ValueError(f"{type(model).__name__} has no Conv2d under its conv1 prefixes {stem}")


def _check_transfusion_k(k: object, stages: Sequence[str]) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(stages):
        names = ", ".join(f"{i}: up to {stage}" for i, stage in enumerate(stages))
        raise ValueError(f"transfusion k must be an int in 0..{len(stages) - 1} ({names}), got {k!r}")


def check_init_options(name: str, options: Mapping[str, object], *, stages: Sequence[str]) -> None:
    """Checks ``options`` of init ``name`` for a model with ``stages`` (conv1 first), without building it."""
    _check_options(name, INITS.get(name), options)
    if name == "transfusion":
        _check_transfusion_k(options["k"], stages)


def _check_options(name: str, init_fn: InitFn, options: Mapping[str, object]) -> None:
    params = inspect.signature(init_fn).parameters
    allowed = {p for p, spec in params.items() if spec.kind is spec.KEYWORD_ONLY} - {
        "source",
        "seed",
    }
    required = {p for p in allowed if params[p].default is inspect.Parameter.empty}
    unknown = sorted(set(options) - allowed)
    missing = sorted(required - set(options))
    if unknown or missing:
        valid = ", ".join(sorted(allowed)) or "none"
        raise ValueError(f"init {name!r}: unknown options {unknown}, missing options {missing}; valid options: {valid}")


def _as_state_dict(source: Source) -> StateDict:
    if isinstance(source, LoadedWeights):
        return source.state_dict
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, str):
        loaded = load_pretrained(source) if source in PRETRAINED else load_state_dict_from_uri(source)
        return loaded.state_dict
    if isinstance(source, Mapping):
        return source
    raise TypeError(
        "source must be a state dict, LoadedWeights, module, pretrained-source name or URI; "
        f"got {type(source).__name__}"
    )


def _require_source(model: CaptureModel, source: StateDict | None, init: str) -> dict[str, torch.Tensor]:
    if source is None:
        raise ValueError(f"init {init!r} needs a source: pass source=<state dict, pretrained-source name or URI>")
    return _adapt_stem(model, source)


def _adapt_stem(model: CaptureModel, source: StateDict) -> dict[str, torch.Tensor]:
    """Fits a source's stem filters to the model's input channels.

    3 -> 1: the RGB filters summed, which is exactly what a grey image copied to three
    channels sees. 1 -> 3 (a source pretrained on grey x-rays, a colour target): the grey
    filter split evenly over RGB, so a grey input gives the source's own response.
    """
    adapted = dict(source)
    key = stem_conv_key(model)
    weight = model.state_dict()[key]
    if key not in source or source[key].ndim != 4:
        return adapted
    if weight.shape[1] == 1 and source[key].shape[1] == 3:
        adapted[key] = source[key].sum(dim=1, keepdim=True)
        logger.info("summed the RGB filters of %s over the input-channel axis for a 1-channel model", key)
    elif weight.shape[1] == 3 and source[key].shape[1] == 1:
        adapted[key] = source[key].expand(-1, 3, -1, -1) / 3
        logger.info("split the grey filters of %s evenly over RGB for a 3-channel model", key)
    return adapted


def _is_counter(key: str) -> bool:
    return key.endswith(_COUNTER_SUFFIX)


def _classifier_keys(model: CaptureModel, target: StateDict, source: StateDict) -> set[str]:
    prefixes = model.classifier_prefixes()
    return {key for key in (*target, *source) if key.startswith(prefixes)}


def _batch_norm_keys(model: CaptureModel) -> set[str]:
    return {
        f"{name}.{tensor}"
        for name, module in model.named_modules()
        if isinstance(module, _BATCH_NORMS)
        for tensor in ("weight", "bias", "running_mean", "running_var")
    }


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return f"{keys[:_MAX_KEYS_SHOWN]}{more}"


def _check_fits(
    model: CaptureModel,
    target: StateDict,
    source: StateDict,
    *,
    in_scope: Callable[[str], bool],
    init: str,
) -> None:
    """Raises if any in-scope key is missing from, extra in or shaped differently in the source."""
    wanted = [k for k in target if in_scope(k) and not _is_counter(k)]
    missing = [k for k in wanted if k not in source]
    extra = [k for k in source if in_scope(k) and not _is_counter(k) and k not in target]
    misshaped = [
        f"{k}: model {tuple(target[k].shape)} vs source {tuple(source[k].shape)}"
        for k in wanted
        if k in source and target[k].shape != source[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from source {_shown(missing)}")
    if extra:
        problems.append(f"unexpected in source {_shown(extra)}")
    if misshaped:
        problems.append(f"shape mismatch {_shown(misshaped)}")
    if problems:
        raise ValueError(
            f"init {init!r}: source state dict does not fit {type(model).__name__}: " + "; ".join(problems)
        )


def _log_skipped_classifier(init: str, target: StateDict, source: StateDict, skipped: list[str]) -> None:
    for key in skipped:
        found = tuple(source[key].shape) if key in source else "absent"
        logger.warning(
            "init %r: classifier %s left random (model %s, source %s)",
            init,
            key,
            tuple(target[key].shape),
            found,
        )


def _copy(target: StateDict, source: StateDict, keys: list[str]) -> None:
    # state_dict() tensors share storage with the model's parameters and buffers.
    with torch.no_grad():
        for key in keys:
            target[key].copy_(source[key].to(dtype=target[key].dtype, device=target[key].device))


def _derived_seed(seed: int, stream: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "little") & (2**63 - 1)


@contextmanager
def _seeded(seed: int, model: nn.Module) -> Iterator[None]:
    """Seeds CPU and the model's CUDA devices, restoring every RNG state afterwards."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
