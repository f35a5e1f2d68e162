"""The training loop: plain PyTorch, runs with or without Ray.

In the shape of torchvision's ``references/classification/train.py``: one
:class:`LoopState` built once (``model_without_ddp`` set there), then small functions
over it — :func:`train_one_step`, :func:`validate`, :func:`probe`, :func:`checkpoint` —
and :func:`run_training` calling them in order.

Ray (or a test) plugs in through :class:`TrainingHooks` — where metrics, artifacts and
checkpoints go — and through ``prepare_model`` (the DDP wrapper). Batches are a pure
function of ``(seed, step)``, so a job resumed from a checkpoint sees exactly the
batches the uninterrupted job would have seen.

One job also runs on its own, without Ray or a tracking server (metrics to stdout and a
CSV file), in a debugger or under ``torchrun`` for DDP::

    python -m transfusion.train spec.yaml --output-dir runs/one
    torchrun --nproc_per_node 2 -m transfusion.train spec.yaml --output-dir runs/ddp
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from transfusion.config import JobSpec
from transfusion.constants import IMAGENET_MEAN, IMAGENET_STD
from transfusion.data.block_shuffle import block_shuffle
from transfusion.data.prepared import PreparedDataset
from transfusion.metrics import classification_scores, save_test_predictions
from transfusion.models import create_model
from transfusion.probes import ProbeSampling, capture_activations, save_probe

log = logging.getLogger(__name__)

# torchvision's Inception-v3 reference weights the aux head's loss by 0.4.
AUX_LOSS_WEIGHT = 0.4
# train.init_bn: recalibrate -- training images whose batch statistics become the
# running statistics the step-0 probe and validation use (the first of the training
# split, in batches of train.batch_size: the same images for every run of a grid).
INIT_BN_IMAGES = 256
# Inits that copy every tensor of the source (all but a head of another shape): for them the
# network the job starts from *is* the source, probed once as it is (``probes/source.npz``).
SOURCE_PROBE_INITS = frozenset({"imagenet"})
SOURCE_PROBE_TAG = "source"
# Per named stage, how far training moved the weights: ``distance/conv1``, ``distance/stage1`` ...
DISTANCE_PREFIX = "distance/"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the job cannot go on."""


class TrainingHooks(Protocol):
    """Where the loop sends what it produces (MLflow + Ray, or a test's recorder)."""

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None: ...

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None: ...

    def checkpoint(self, state: dict[str, Any], *, step: int, metrics: dict[str, float]) -> None: ...

    def log_model(self, model: nn.Module, *, input_example: np.ndarray, metrics: dict[str, float], step: int) -> None:
        """The final model with an input batch and the test metrics it scored (logged with it)."""
        ...


@runtime_checkable
class StepFaults(Protocol):
    """Hooks that can also corrupt a step: test-only fault injection (:mod:`transfusion.faults`)
    wraps the real hooks this way, so the loop needs no import of it."""

    def corrupt_loss(self, loss: torch.Tensor, *, step: int) -> torch.Tensor: ...

    def after_step(self, step: int) -> None: ...


class RecordingHooks:
    """Keeps everything in memory; for tests and bare runs."""

    def __init__(self, artifact_dir: Path | None = None) -> None:
        self.metrics: list[tuple[int, str, float]] = []
        self.artifacts: dict[str, Path] = {}
        self.checkpoints: list[tuple[int, dict[str, Any]]] = []
        self.artifact_dir = artifact_dir
        self.model: nn.Module | None = None

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        self.metrics.extend((step, k, float(v)) for k, v in metrics.items())

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        name = f"{artifact_path}/{local_path.name}" if artifact_path else local_path.name
        if self.artifact_dir is not None:
            target = self.artifact_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(local_path.read_bytes())
            local_path = target
        self.artifacts[name] = local_path

    def checkpoint(self, state: dict[str, Any], *, step: int, metrics: dict[str, float]) -> None:
        # The state holds live tensors that later steps update in place.
        self.checkpoints.append((step, copy.deepcopy(state)))

    def log_model(self, model: nn.Module, *, input_example: np.ndarray, metrics: dict[str, float], step: int) -> None:
        self.model = model
        self.log_metrics(metrics, step=step)

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(s, v) for s, k, v in self.metrics if k == key]


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    train_seconds: float
    final_metrics: dict[str, float]
    val_history: list[tuple[int, float]] = field(default_factory=list)
    # Fixed costs around the loop: model build + step-0 probe/evaluation, and the final
    # probe + test evaluation + weights upload (what a job pays besides training).
    setup_seconds: float = 0.0
    finish_seconds: float = 0.0


def normalize(
    batch_uint8: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], then normalised by the model's statistics."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    m, s = torch.tensor(mean), torch.tensor(std)
    if x.shape[1] == 1:  # grey input: the channel mean of the RGB statistics
        m, s = m.mean().reshape(1), s.mean().reshape(1)
    return (x - m.view(1, -1, 1, 1).to(x.device)) / s.view(1, -1, 1, 1).to(x.device)


def augment(x: torch.Tensor, *, policy: str, generator: torch.Generator) -> torch.Tensor:
    """On-the-fly augmentation of a normalised NCHW batch (flips, rotations, shifts)."""
    if policy == "none":
        return x
    n = x.shape[0]
    flips = torch.rand(n, 2, generator=generator) < 0.5
    x = torch.where(flips[:, 0].view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    if policy == "fundus":
        # A fundus has no canonical orientation: vertical flips and quarter turns too.
        x = torch.where(flips[:, 1].view(-1, 1, 1, 1).to(x.device), x.flip(-2), x)
        if x.shape[-1] == x.shape[-2]:
            k = int(torch.randint(0, 4, (1,), generator=generator))
            x = torch.rot90(x, k, dims=(-2, -1))
    elif policy in ("xray", "natural"):
        shift = int(round(0.04 * x.shape[-1]))
        if shift:
            dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return x


def batch_indices(pool: np.ndarray, *, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The training batch of ``step``: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, 7919, step])
    return np.sort(rng.choice(pool, size=min(batch_size, len(pool)), replace=False))


def load_images(
    dataset: PreparedDataset,
    index: np.ndarray,
    device: torch.device,
    model: nn.Module | None = None,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """A normalised batch of ``dataset`` images (for ``model``'s input statistics; pass
    the model itself, not its DDP wrapper), block-shuffled on the device when ``block`` is set
    (the job's ``block_shuffle``: every split sees the same permutation)."""
    stats = {}
    if model is not None:
        stats = {"mean": getattr(model, "input_mean", IMAGENET_MEAN), "std": getattr(model, "input_std", IMAGENET_STD)}
    # uint8 crosses to the device (4x less traffic than float); normalising happens there.
    batch = torch.from_numpy(np.ascontiguousarray(dataset.images[index])).to(device, non_blocking=True)
    x = normalize(batch, **stats)
    return x if block is None else block_shuffle(x, block=block)


def input_statistics(spec: JobSpec) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) the spec's model normalises inputs with when its source prescribes them, else None
    (the architecture's own, ImageNet statistics for every registered family)."""
    from transfusion.pretrained import source_for

    registered = source_for(spec.pretrained) if spec.pretrained else None
    if registered is None:
        return None
    return tuple(registered.preprocessing.mean), tuple(registered.preprocessing.std)


def create_job_model(spec: JobSpec, dataset: PreparedDataset) -> nn.Module:
    """The spec's architecture for ``dataset`` as its constructor draws it, reading inputs as the job does.

    Not initialised by the spec's init: :func:`build_model` does that; an analysis that loads
    stored weights into it needs only the architecture and the input statistics.
    """
    model = create_model(spec.model, num_classes=dataset.num_labels, in_channels=dataset.in_channels)
    statistics = input_statistics(spec)
    if statistics is not None:
        # Inputs as the source's weights saw them (ViT AugReg wants [-1, 1], not ImageNet statistics).
        model.input_mean, model.input_std = statistics
    return model


def build_model(spec: JobSpec, dataset: PreparedDataset, *, source_state: dict[str, torch.Tensor] | None) -> nn.Module:
    """The spec's model, initialised by the spec's init (seeded)."""
    from transfusion.inits import initialize

    torch.manual_seed(spec.seed)
    model = create_job_model(spec, dataset)
    return initialize(model, spec.init, source=source_state, seed=spec.seed, **spec.init_options)


def _batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every batch-norm layer that keeps running statistics (the ones eval mode reads)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restores the torch (CPU and CUDA), numpy and Python RNG states on exit.

    A forward in train mode draws from torch's stream (dropout, drop-path); without
    this a run with the step-0 probe would train differently from one without.
    """
    cpu, py, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        random.setstate(py)
        np.random.set_state(np_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module, batches: Iterable[torch.Tensor], *, device: torch.device | str | None = None
) -> int:
    """Replaces every batch-norm layer's running statistics by those of ``batches``.

    Fresh statistics (reset, then ``momentum=None``: a cumulative average with equal
    weight per batch) from forwards in train mode under ``torch.no_grad()``; weights,
    batch-norm's affine weight and bias, each layer's momentum, the model's mode and
    every RNG stream are as before. This is what eval mode should see when the running
    statistics say nothing about the data -- at init (mean 0, var 1 for random and
    Mean-Var layers; the source's for transferred ones) or after weights were moved.

    Args:
        model: The model itself (not a DDP wrapper: no collective is wanted here).
        batches: Normalised NCHW input batches, each of at least two images.
        device: Where the batches go before the forward (None: where they are).

    Returns:
        The number of batch-norm layers recalibrated (0: none, and no forward ran).
    """
    layers = _batch_norm_layers(model)
    if not layers:
        return 0
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:  # reset statistics with nothing to fill them would be silent zeros
        raise ValueError("recalibrate_batch_norm needs at least one batch of images; got none")
    momenta = [m.momentum for m in layers]
    was_training = model.training
    with _rng_untouched():
        try:
            for m in layers:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            for batch in itertools.chain([first], iterator):
                batch = batch if device is None else batch.to(device)
                # The memory format training feeds (a channels-last model reads NCHW either way).
                model(batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 else batch)
        finally:
            for m, momentum in zip(layers, momenta, strict=True):
                m.momentum = momentum
            model.train(was_training)
    return len(layers)


def init_bn_batches(
    spec: JobSpec, dataset: PreparedDataset, device: torch.device, model: nn.Module
) -> Iterator[torch.Tensor]:
    """The batches ``train.init_bn: recalibrate`` reads: the first :data:`INIT_BN_IMAGES`
    training-split images, unaugmented, in full batches of ``train.batch_size`` (one
    batch of them all when the split is smaller).

    A source of its own, never the training batches: those are a function of
    (seed, step) and stay exactly those of a run without the step-0 probe.
    """
    images = dataset.indices("train")[:INIT_BN_IMAGES]
    if len(images) == 0:
        raise ValueError(f"dataset {dataset.meta.get('name', '?')!r} has no training images to calibrate batch norm on")
    size = min(spec.train.batch_size, len(images))
    for start in range(0, len(images) - size + 1, size):
        yield load_images(dataset, images[start : start + size], device, model, block=spec.block_shuffle_or_none)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int) -> np.ndarray:
    """The model's logits (float32) on ``images``.

    Logits, not sigmoids: AUC only needs a monotone score, and a float32 sigmoid is
    exactly 1.0 above a logit of about 16.6, which ties the most confident images.
    """
    was_training = model.training
    model.eval()
    try:
        chunks = [model(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks).cpu().numpy()


def predict_index(
    model: nn.Module,
    dataset: PreparedDataset,
    index: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    block: int | None = None,
) -> np.ndarray:
    """The model's logits on the ``dataset`` images of ``index`` (block-shuffled by ``block`` when set),
    loaded a few batches at a time."""
    scores = []
    for start in range(0, len(index), batch_size * 4):
        chunk = index[start : start + batch_size * 4]
        images = load_images(dataset, chunk, device, model, block=block)
        scores.append(predict(model, images, batch_size=batch_size))
    return np.concatenate(scores)


def evaluate(
    model: nn.Module,
    dataset: PreparedDataset,
    index: np.ndarray,
    *,
    prefix: str,
    batch_size: int,
    device: torch.device,
    predictions_path: Path | None = None,
    block: int | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``index`` (block-shuffled by ``block`` when set); ``predictions_path``
    also keeps the scores (paired comparisons)."""
    scores_all = predict_index(model, dataset, index, batch_size=batch_size, device=device, block=block)
    targets = dataset.targets[index]
    multiclass = dataset.meta.get("task") == "multiclass"
    if predictions_path is not None:
        groups = None if dataset.groups is None else dataset.groups[index]  # patients: resampled together
        save_test_predictions(predictions_path, index=index, scores=scores_all, targets=targets, groups=groups,
                              label_names=dataset.label_names)  # fmt: skip
    # A many-class source's split cannot hold every class; its headline metric is accuracy.
    result = classification_scores(scores_all, targets, dataset.label_names, macro_over_defined=multiclass)
    if multiclass:
        accuracy = float(np.mean(scores_all.argmax(axis=1) == targets.argmax(axis=1)))
        # Top-5: the true class among the five highest scores (all classes when there are fewer).
        top5 = np.argsort(-scores_all, axis=1)[:, :5]
        top5_accuracy = float(np.mean((top5 == targets.argmax(axis=1)[:, None]).any(axis=1)))
        return {f"{prefix}/auc": result.auc, f"{prefix}/accuracy": accuracy, f"{prefix}/top5": top5_accuracy}
    return result.as_metrics(prefix)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over non-NaN targets (NaN = ignore, e.g. CheXpert U-Ignore)."""
    keep = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(targets), reduction="none")
    return (loss * keep).sum() / keep.sum().clamp(min=1)


def multiclass_ce(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy for one-hot targets (pretraining on a many-class source)."""
    return F.cross_entropy(logits.float(), targets.argmax(dim=1), label_smoothing=label_smoothing)


def make_optimizer(
    spec: JobSpec, model: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    t = spec.train
    if t.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True
        )

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_pool(spec: JobSpec, dataset: PreparedDataset) -> np.ndarray:
    """The job's training images: drawn with its own seed, or with ``train.subset_seed`` for every seed.

    A fixed subset leaves only init and batch order to vary across seeds.
    """
    subset_seed = spec.seed if spec.train.subset_seed is None else spec.train.subset_seed
    return dataset.training_subset(spec.data_size_or_none, seed=subset_seed)


def _finite_on_every_rank(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on all ranks: a rank alone stopping would leave the
    others waiting in DDP's next all-reduce."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


class TrainingForward(nn.Module):
    """The training forward as one module: ``(logits, aux_logits or None)``.

    DDP synchronises gradients only through its wrapped module's ``forward``; calling
    ``model.module.forward_with_aux`` would bypass it. So the module DDP wraps is this
    one, and Inception's aux logits come out of the wrapped call too.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hasattr(self.model, "forward_with_aux"):
            return self.model.forward_with_aux(x)
        return self.model(x), None


def _freeze_unfed_aux_head(model: nn.Module, resolution: int) -> None:
    """An aux head the input is too small to feed gets no gradient; frozen, DDP does not
    wait for one (its reducer expects a gradient for every trainable parameter)."""
    aux = getattr(model, "AuxLogits", None)
    if aux is not None and resolution < getattr(model, "aux_min_input_size", 0):
        aux.requires_grad_(False)


@dataclass
class LoopState:
    """Everything one job's loop reads and updates."""

    spec: JobSpec
    dataset: PreparedDataset
    hooks: TrainingHooks
    model: nn.Module  # the training forward, DDP-wrapped under DDP: forward/backward only
    model_without_ddp: nn.Module  # the model itself: weights, evaluation, probes, checkpoints
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    workdir: Path  # artifacts before upload; removed when the job ends
    rank: int = 0
    world_size: int = 1
    step: int = 0
    val_history: list[tuple[int, float]] = field(default_factory=list)
    # select: best-val -- the step, validation AUC and a CPU copy of the weights at the best validation AUC
    best_val: dict[str, Any] = field(default_factory=lambda: {"step": None, "auc": -math.inf, "model": None})
    # A CPU copy of every parameter as initialised (carried in checkpoints): what the final
    # distances from init are measured against. None for a job resumed from an older checkpoint.
    initial_weights: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        t, data = self.spec.train, self.dataset
        self.pool = training_pool(self.spec, data)
        self.val_index = data.indices("val")[: t.val_limit or None]
        self.probe_index = data.indices("val")[: t.probe_size]
        self.policy = data.meta.get("augment", "fundus") if t.augment else "none"
        self.loss_fn: Callable = (
            functools.partial(multiclass_ce, label_smoothing=t.label_smoothing)
            if data.meta.get("task") == "multiclass"
            else masked_bce
        )
        self.faults = self.hooks if isinstance(self.hooks, StepFaults) else None

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_without_ddp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "spec": self.spec.model_dump(mode="json"),
            "best_val": dict(self.best_val) if self.spec.train.select == "best-val" else None,
            "initial_weights": self.initial_weights,
        }


def setup(
    spec: JobSpec,
    dataset: PreparedDataset,
    *,
    hooks: TrainingHooks,
    workdir: Path,
    source_state: dict[str, torch.Tensor] | None = None,
    resume: dict[str, Any] | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> LoopState:
    """The model (initialised, or restored from ``resume``), its optimiser and the loop state."""
    model = build_model(spec, dataset, source_state=source_state if resume is None else None)
    _freeze_unfed_aux_head(model, dataset.resolution)
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(spec, model)
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step = int(resume["step"])
        log.info("resuming %s at step %d", spec.job_key, step)
    forward = TrainingForward(model)
    if prepare_model is not None:
        forward = prepare_model(forward)
    state = LoopState(spec, dataset, hooks, forward, model, optimizer, scheduler, device, workdir,
                      rank=rank, world_size=world_size, step=step)  # fmt: skip
    if resume is not None and resume.get("best_val") is not None:
        state.best_val.update(resume["best_val"])
    if resume is None:
        state.initial_weights = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
    else:
        state.initial_weights = resume.get("initial_weights")
    return state


def train_one_step(state: LoopState) -> float:
    """One optimiser step on this rank's share of the step's batch; returns its loss."""
    spec, data, device = state.spec, state.dataset, state.device
    index = batch_indices(state.pool, seed=spec.seed, step=state.step, batch_size=spec.train.batch_size)
    index = index[state.rank :: state.world_size]
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + state.step)
    # Shuffled before augmenting: a flip or shift then moves the shuffled image, as a
    # data loader would augment a shuffled data set.
    x = load_images(data, index, device, state.model_without_ddp, block=spec.block_shuffle_or_none)
    x = augment(x, policy=state.policy, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(data.targets[index]).to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=state.on_gpu):
        logits, aux = state.model(x)
        loss = state.loss_fn(logits, y)
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * state.loss_fn(aux, y)
    if state.faults is not None:
        loss = state.faults.corrupt_loss(loss, step=state.step)
    if not _finite_on_every_rank(loss, state.world_size):
        raise NonFiniteLossError(f"loss is {loss.item()} at step {state.step}")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    if state.faults is not None:
        state.faults.after_step(state.step)
    return float(loss.detach())


def validate(state: LoopState) -> dict[str, float]:
    """Validation metrics at the current step (chief only), kept in ``val_history``."""
    t = state.spec.train
    metrics = evaluate(state.model_without_ddp, state.dataset, state.val_index, prefix="val",
                       batch_size=t.eval_batch_size, device=state.device,
                       block=state.spec.block_shuffle_or_none)  # fmt: skip
    state.val_history.append((state.step, metrics["val/auc"]))
    best = state.best_val
    current, kept = metrics["val/auc"], best["auc"]
    # NaN validation AUC: a label with one class in the split (NaN at every step: the newest step wins) or
    # non-finite scores (a diverged model never replaces a finite best).
    better = not math.isnan(current) and (kept is None or math.isnan(kept) or current > kept)
    if t.select == "best-val" and (best["step"] is None or better or (math.isnan(current) and math.isnan(kept))):
        # A CPU copy of the weights at the best validation AUC, tested in place of the last ones.
        weights = {k: v.detach().to("cpu", copy=True) for k, v in state.model_without_ddp.state_dict().items()}
        best.update(step=state.step, auc=metrics["val/auc"], model=weights)
    return metrics


def _probe_activations(state: LoopState) -> dict[str, np.ndarray]:
    model, t = state.model_without_ddp, state.spec.train
    images = load_images(state.dataset, state.probe_index, state.device, model, block=state.spec.block_shuffle_or_none)
    sampling = ProbeSampling(rows_per_channel=t.probe_rows_per_channel, seed=t.probe_seed)
    return capture_activations(model, images, sampling=sampling)


def probe(state: LoopState, tag: str) -> None:
    """Saves the probe set's activations and the first conv's filters as artifacts."""
    if not (state.is_chief and len(state.probe_index)):
        return
    model = state.model_without_ddp
    activations = _probe_activations(state)
    state.hooks.log_artifact(save_probe(state.workdir / f"{tag}.npz", activations), "probes")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        path = state.workdir / "filters" / f"{tag}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, first_conv.weight.detach().to("cpu", torch.float32).numpy())
        state.hooks.log_artifact(path, "filters")


def probe_source(state: LoopState) -> None:
    """For a transfer init (:data:`SOURCE_PROBE_INITS`), the source network on the probe images:
    ``probes/source.npz``, taken before anything else touches the model.

    The transferred weights with the source's own batch-norm statistics, in eval mode (no
    recalibration: that would make it the step-0 probe of ``init_bn: recalibrate``), on the
    same images and (image, h, w) rows as every other probe of the run, so the analysis can
    compare the fine-tuned network with its source layer by layer. The head is the job's new
    one, so ``logits`` says nothing of the source. Every RNG stream is restored, so training
    is the same as without it.
    """
    if not (state.is_chief and len(state.probe_index)) or state.spec.init not in SOURCE_PROBE_INITS:
        return
    with _rng_untouched():
        activations = _probe_activations(state)
    state.hooks.log_artifact(save_probe(state.workdir / f"{SOURCE_PROBE_TAG}.npz", activations), "probes")


def distances_from_init(model: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per named stage, ``||W_final - W_init|| / ||W_init||`` over the stage's parameters.

    ``W`` is every parameter whose state-dict name starts with one of the stage's prefixes
    (:meth:`~transfusion.models.base.CaptureModel.stage_prefixes`: conv1, stage1..K, the layers
    the probes analyse), flattened into one vector: conv and linear weights and biases and
    batch-norm's affine weight and bias; running statistics are buffers, not weights, and are
    left out. Sums in float64. A stage whose initial weights are all zero has no relative
    distance: NaN, logged.

    Args:
        model: The model with its final weights (not a DDP wrapper).
        initial: Its parameters at init by name (:attr:`LoopState.initial_weights`).

    Returns:
        ``{stage: distance}`` in the stages' forward order; empty for a model that names no stages.
    """
    stages = getattr(model, "stage_prefixes", None)
    if stages is None:
        return {}
    final = dict(model.named_parameters())
    distances = {}
    for stage, prefixes in stages():
        names = [name for name in initial if name.startswith(prefixes) and name in final]
        moved = sum(float(((final[n].detach().cpu().double() - initial[n].double()) ** 2).sum()) for n in names)
        size = sum(float((initial[n].double() ** 2).sum()) for n in names)
        if size == 0.0:
            log.warning("stage %s: initial weights all zero (%d tensors); no relative distance", stage, len(names))
            distances[stage] = math.nan
            continue
        distances[stage] = math.sqrt(moved) / math.sqrt(size)
    return distances


@contextlib.contextmanager
def batch_norm_at_init(state: LoopState) -> Iterator[None]:
    """The batch-norm statistics the step-0 probe and validation run with (``train.init_bn``).

    ``recalibrate``: eval mode with running statistics recalibrated on fixed training
    images (:func:`recalibrate_batch_norm`), so the representation at init is normalised
    as training's first step normalises it, for every init alike (the initial running
    statistics -- mean 0, var 1 for random and Mean-Var layers, the source's for
    transferred ones -- can leave a whole layer's ReLUs off). ``running``: the initial
    running statistics as they are. On exit the init's own buffers come back, so the
    training that follows (weights, running statistics, RNG streams) is bit-identical
    either way. (With ``train.select: best-val`` a step-0 best keeps the statistics it
    was validated with.) Chief only: the other ranks neither probe nor validate.
    """
    model, t = state.model_without_ddp, state.spec.train
    if t.init_bn == "running":
        yield
        return
    layers = _batch_norm_layers(model)
    saved = [[b.detach().clone() for b in m.buffers()] for m in layers]
    try:
        recalibrate_batch_norm(model, init_bn_batches(state.spec, state.dataset, state.device, model))
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(layers, saved, strict=True):
                for live, kept in zip(m.buffers(), buffers, strict=True):
                    live.copy_(kept)


def checkpoint(state: LoopState, metrics: dict[str, float]) -> None:
    """Hands the training state to the hooks (every rank calls; the hooks decide who writes)."""
    state.hooks.checkpoint(state.state_dict(), step=state.step, metrics=metrics)


def log_costs(state: LoopState) -> None:
    from transfusion.cost import forward_flops, training_flops

    t, model = state.spec.train, state.model_without_ddp
    flops = forward_flops(model, in_channels=state.dataset.in_channels, resolution=state.dataset.resolution)
    state.hooks.log_metrics(
        {
            "cost/params": float(sum(p.numel() for p in model.parameters())),
            "cost/forward_flops": float(flops),
            "cost/train_flops": training_flops(flops, steps=t.steps, batch_size=t.batch_size),
        },
        step=0,
    )


def train_until_done(state: LoopState) -> None:
    """Steps until ``train.steps``: logs the running loss, validates and checkpoints on schedule."""
    t = state.spec.train
    running_loss, running_count = 0.0, 0
    state.model.train()
    while state.step < t.steps:
        running_loss += train_one_step(state)
        running_count += 1
        step = state.step
        evaluate_now = step % t.eval_every == 0 or step == t.steps
        if state.is_chief and (step % max(1, t.eval_every // 5) == 0 or step == t.steps):
            lr = state.scheduler.get_last_lr()[0]
            state.hooks.log_metrics({"train/loss": running_loss / running_count, "train/lr": lr}, step=step)
            running_loss, running_count = 0.0, 0
        metrics: dict[str, float] = {}
        if state.is_chief and evaluate_now:
            metrics = validate(state)
            state.hooks.log_metrics(metrics, step=step)
        if evaluate_now or (t.checkpoint_every and step % t.checkpoint_every == 0):
            checkpoint(state, metrics)


def finish(state: LoopState, *, train_seconds: float) -> dict[str, float]:
    """Final probe, test metrics and the trained weights (chief only); the final metrics."""
    if not state.is_chief:
        return {}
    probe(state, f"step-{state.step}")
    t, best = state.spec.train, state.best_val
    selected_best = t.select == "best-val" and best["model"] is not None
    if selected_best:
        state.model_without_ddp.load_state_dict(best["model"])
    predictions = state.workdir / "predictions" / "test.npz"
    final = evaluate(state.model_without_ddp, state.dataset, state.dataset.indices("test"), prefix="test",
                     batch_size=t.eval_batch_size, device=state.device, predictions_path=predictions,
                     block=state.spec.block_shuffle_or_none)  # fmt: skip
    state.hooks.log_artifact(predictions, "predictions")
    # Which weights the test metrics are of: the last step, or the best validation step.
    final["test/selected_step"] = float(best["step"] if selected_best else state.step)
    final["time/train_s"] = train_seconds
    final["time/gpu_s"] = train_seconds * (t.gpus_per_job * state.world_size if state.on_gpu else 0.0)
    weights = state.workdir / "model.pt"
    torch.save(state.model_without_ddp.state_dict(), weights)
    state.hooks.log_artifact(weights, "checkpoint")
    # How far the tested weights moved from init, per stage (a job resumed from a checkpoint
    # written before initial weights were kept has nothing to measure against).
    if state.initial_weights is not None:
        distances = distances_from_init(state.model_without_ddp, state.initial_weights)
        state.hooks.log_metrics({DISTANCE_PREFIX + stage: d for stage, d in distances.items()}, step=state.step)
    else:
        log.info("job %s: no initial weights in its checkpoint; distances from init not logged", state.spec.job_key)
    # The final model as a first-class model (MLflow: a logged model linked to these test metrics).
    model = state.model_without_ddp
    example = load_images(state.dataset, state.dataset.indices("test")[:2], torch.device("cpu"), model,
                          block=state.spec.block_shuffle_or_none).numpy()  # fmt: skip
    state.hooks.log_model(model, input_example=example, metrics=final, step=state.step)
    return final


def run_training(
    spec: JobSpec,
    dataset: PreparedDataset,
    *,
    hooks: TrainingHooks,
    source_state: dict[str, torch.Tensor] | None = None,
    resume: dict[str, Any] | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingResult:
    """Trains ``spec`` on ``dataset``; returns the final metrics.

    ``resume`` is a state from :meth:`TrainingHooks.checkpoint`; ``prepare_model`` wraps
    the training forward for DDP. Wrap ``hooks`` in :class:`transfusion.faults.FaultInjection` to inject faults.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transfusion-job-") as workdir:
        state = setup(spec, dataset, hooks=hooks, workdir=Path(workdir), source_state=source_state, resume=resume,
                      prepare_model=prepare_model, device=device, rank=rank, world_size=world_size)  # fmt: skip
        if resume is None and state.is_chief:
            log_costs(state)
            probe_source(state)
            with batch_norm_at_init(state):
                probe(state, "step-0")
                hooks.log_metrics(validate(state), step=0)
        loop_started = time.perf_counter()
        train_until_done(state)
        loop_ended = time.perf_counter()
        final = finish(state, train_seconds=loop_ended - loop_started)
    return TrainingResult(
        steps=state.step,
        train_seconds=loop_ended - loop_started,
        final_metrics=final,
        val_history=state.val_history,
        setup_seconds=loop_started - started,
        finish_seconds=time.perf_counter() - loop_ended,
    )


# --- one job on its own: ``python -m transfusion.train spec.yaml`` (or under torchrun) ---


class CsvHooks:
    """Metrics to stdout and ``metrics.csv``, artifacts and checkpoints under ``output_dir``
    (checkpoints only from rank 0)."""

    def __init__(self, output_dir: Path, *, rank: int = 0) -> None:
        from transfusion.checkpoints import JobCheckpoints

        self.output_dir, self.rank = output_dir, rank
        self.checkpoints = JobCheckpoints(str(output_dir), "standalone")
        self.csv_path = output_dir / "metrics.csv"

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        new = not self.csv_path.exists()
        with self.csv_path.open("a") as csv:
            if new:
                csv.write("step,key,value\n")
            for key, value in metrics.items():
                csv.write(f"{step},{key},{float(value)!r}\n")
        print(f"step {step}: " + "  ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()), flush=True)

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        target = self.output_dir / (artifact_path or "") / local_path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(local_path.read_bytes())

    def checkpoint(self, state: dict[str, Any], *, step: int, metrics: dict[str, float]) -> None:
        if self.rank == 0:
            self.checkpoints.save(state, step=step)

    def log_model(self, model: nn.Module, *, input_example: np.ndarray, metrics: dict[str, float], step: int) -> None:
        # Standalone: the weights are already under checkpoint/model.pt; the metrics go to the CSV.
        self.log_metrics(metrics, step=step)


def _source_state(spec: JobSpec) -> dict[str, torch.Tensor] | None:
    """The spec's pretrained weights: a registered source name or a URI/path."""
    if not spec.pretrained:
        return None
    from transfusion.pretrained import PRETRAINED, load_state_dict_from_uri

    uri = PRETRAINED.get(spec.pretrained).uri if spec.pretrained in PRETRAINED.names() else spec.pretrained
    return load_state_dict_from_uri(uri).state_dict


def _distributed_from_env() -> tuple[int, int, torch.device, Callable[[nn.Module], nn.Module] | None]:
    """(rank, world size, device, DDP wrapper) from torchrun's variables; one process without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if on_gpu else "cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo")

    def wrap(module: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(module, device_ids=[local_rank] if on_gpu else None)

    return torch.distributed.get_rank(), world_size, device, wrap


def main(argv: list[str] | None = None) -> int:
    """Trains the job of a spec file (a :class:`JobSpec` as YAML or JSON) without Ray or MLflow."""
    import argparse

    import yaml

    from transfusion.data import prepare_dataset

    parser = argparse.ArgumentParser(prog="python -m transfusion.train", description=main.__doc__)
    parser.add_argument("spec", type=Path, help="a JobSpec file (YAML or JSON)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: runs/<grid>-<job_key>")
    args = parser.parse_args(argv)
    if not args.spec.is_file():
        raise SystemExit(f"error: spec file {args.spec} does not exist")
    spec = JobSpec.model_validate(yaml.safe_load(args.spec.read_text()))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank, world_size, device, wrap = _distributed_from_env()
    try:
        output_dir = args.output_dir or Path("runs") / f"{spec.grid}-{spec.job_key}"
        output_dir.mkdir(parents=True, exist_ok=True)
        prepare = lambda: prepare_dataset(spec.dataset, source=spec.dataset_source,  # noqa: E731
                                          resolution=spec.train.resolution, options=spec.dataset_options)  # fmt: skip
        dataset = prepare() if rank == 0 else None
        if world_size > 1:
            torch.distributed.barrier()  # rank 0 prepared the data; the others open it
        hooks = CsvHooks(output_dir, rank=rank)
        resume = hooks.checkpoints.latest()
        result = run_training(spec, dataset or prepare(), hooks=hooks, resume=resume,
                              source_state=None if resume else _source_state(spec), prepare_model=wrap,
                              device=device, rank=rank, world_size=world_size)  # fmt: skip
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"done: {result.steps} steps, test/auc {result.final_metrics.get('test/auc', float('nan')):.4f}; "
              f"metrics in {hooks.csv_path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
