"""The training loop: plain PyTorch, runs with or without Ray.

Ray (or a test) plugs in through :class:`TrainingHooks` — where metrics, artifacts and
checkpoints go — and through ``prepare_model``. Batches are a pure function of
``(seed, step)``, so a job resumed from a checkpoint sees exactly the batches the
uninterrupted job would have seen.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from transfusion.config import JobSpec
from transfusion.data.prepared import PreparedDataset
from transfusion.metrics import classification_scores
from transfusion.models import create_model
from transfusion.probes import capture_activations, save_probe

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    dataset: PreparedDataset, index: np.ndarray, device: torch.device, model: nn.Module | None = None
) -> torch.Tensor:
    """A normalised batch of ``dataset`` images (for ``model``'s input statistics)."""
    stats = {}
    if model is not None:
        inner = _unwrap(model)
        stats = {"mean": getattr(inner, "input_mean", IMAGENET_MEAN), "std": getattr(inner, "input_std", IMAGENET_STD)}
    # uint8 crosses to the device (4x less traffic than float); normalising happens there.
    batch = torch.from_numpy(np.ascontiguousarray(dataset.images[index])).to(device, non_blocking=True)
    return normalize(batch, **stats)


def build_model(spec: JobSpec, dataset: PreparedDataset, *, source_state: dict[str, torch.Tensor] | None) -> nn.Module:
    """The spec's model, initialised by the spec's init (seeded)."""
    from transfusion.inits import initialize

    torch.manual_seed(spec.seed)
    model = create_model(spec.model, num_classes=dataset.num_labels, in_channels=dataset.in_channels)
    return initialize(model, spec.init, source=source_state, seed=spec.seed, **spec.init_options)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        chunks = [torch.sigmoid(model(images[i : i + batch_size]).float()) for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks).cpu().numpy()


def evaluate(
    model: nn.Module,
    dataset: PreparedDataset,
    index: np.ndarray,
    *,
    prefix: str,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    scores = []
    for start in range(0, len(index), batch_size * 4):
        chunk = index[start : start + batch_size * 4]
        scores.append(predict(model, load_images(dataset, chunk, device, model), batch_size=batch_size))
    scores_all, targets = np.concatenate(scores), dataset.targets[index]
    result = classification_scores(scores_all, targets, dataset.label_names)
    if dataset.meta.get("task") == "multiclass":
        accuracy = float(np.mean(scores_all.argmax(axis=1) == targets.argmax(axis=1)))
        return {f"{prefix}/auc": result.auc, f"{prefix}/accuracy": accuracy}
    return result.as_metrics(prefix)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over non-NaN targets (NaN = ignore, e.g. CheXpert U-Ignore)."""
    keep = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(targets), reduction="none")
    return (loss * keep).sum() / keep.sum().clamp(min=1)


def multiclass_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy for one-hot targets (pretraining on a many-class source)."""
    return F.cross_entropy(logits.float(), targets.argmax(dim=1))


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


def _finite_on_every_rank(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on all ranks: a rank alone stopping would leave the
    others waiting in DDP's next all-reduce."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def run_training(
    spec: JobSpec,
    dataset: PreparedDataset,
    *,
    hooks: TrainingHooks,
    source_state: dict[str, torch.Tensor] | None = None,
    resume: dict[str, Any] | None = None,
    prepare_model=None,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    fault_at_step: int | None = None,
    on_step=None,
) -> TrainingResult:
    """Trains ``spec`` on ``dataset``; returns the final metrics.

    ``resume`` is a state from :meth:`TrainingHooks.checkpoint`; ``prepare_model`` wraps
    the model (Ray's DDP); ``fault_at_step`` makes the loss NaN at that step and
    ``on_step(step)`` runs after every optimiser step (both for fault injection).
    """
    t = spec.train
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    started = time.perf_counter()

    model = build_model(spec, dataset, source_state=source_state if resume is None else None)
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(spec, model)
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step = int(resume["step"])
        log.info("resuming %s at step %d", spec.job_key, step)
    if prepare_model is not None:
        model = prepare_model(model)

    pool = dataset.training_subset(spec.data_size_or_none, seed=spec.seed)
    val_index = dataset.indices("val")
    if t.val_limit:
        val_index = val_index[: t.val_limit]
    probe_index = dataset.indices("val")[: t.probe_size]
    policy = dataset.meta.get("augment", "fundus") if t.augment else "none"
    loss_fn = multiclass_ce if dataset.meta.get("task") == "multiclass" else masked_bce
    is_chief = rank == 0
    val_history: list[tuple[int, float]] = []
    artifacts = Path(tempfile.mkdtemp(prefix="transfusion-job-"))

    def probe(tag: str) -> None:
        if not (is_chief and len(probe_index)):
            return
        activations = capture_activations(
            _unwrap(model), load_images(dataset, probe_index, device, model), spatial=t.probe_spatial
        )
        hooks.log_artifact(save_probe(artifacts / f"{tag}.npz", activations), "probes")
        first_conv = next((m for m in _unwrap(model).modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None:
            filters = first_conv.weight.detach().to("cpu", torch.float32).numpy()
            path = artifacts / "filters" / f"{tag}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, filters)
            hooks.log_artifact(path, "filters")

    def validate() -> dict[str, float]:
        metrics = evaluate(
            _unwrap(model), dataset, val_index, prefix="val", batch_size=t.eval_batch_size, device=device
        )
        val_history.append((step, metrics["val/auc"]))
        return metrics

    def state() -> dict[str, Any]:
        return {
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "spec": spec.model_dump(mode="json"),
        }

    if is_chief and resume is None:
        from transfusion.cost import forward_flops, training_flops

        inner = _unwrap(model)
        flops = forward_flops(inner, in_channels=dataset.in_channels, resolution=dataset.resolution)
        hooks.log_metrics(
            {
                "cost/params": float(sum(p.numel() for p in inner.parameters())),
                "cost/forward_flops": float(flops),
                "cost/train_flops": training_flops(flops, steps=t.steps, batch_size=t.batch_size),
            },
            step=0,
        )
    if resume is None:
        probe("step-0")
        if is_chief:
            hooks.log_metrics(validate(), step=0)

    loop_started = time.perf_counter()
    running_loss, running_count = 0.0, 0
    model.train()
    while step < t.steps:
        index = batch_indices(pool, seed=spec.seed, step=step, batch_size=t.batch_size)[rank::world_size]
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
        x = augment(load_images(dataset, index, device, model), policy=policy, generator=generator)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(dataset.targets[index]).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
            inner = _unwrap(model)
            if hasattr(inner, "forward_with_aux") and inner is model:
                logits, aux = inner.forward_with_aux(x)
            else:
                logits, aux = model(x), None
            loss = loss_fn(logits, y)
            if aux is not None:
                # torchvision's Inception-v3 reference weights the aux head by 0.4.
                loss = loss + 0.4 * loss_fn(aux, y)
        if fault_at_step is not None and step == fault_at_step:
            loss = loss * float("nan")
        if not _finite_on_every_rank(loss, world_size):
            raise NonFiniteLossError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        running_loss += float(loss.detach())
        running_count += 1
        if on_step is not None:
            on_step(step)

        log_now = step % max(1, t.eval_every // 5) == 0 or step == t.steps
        evaluate_now = step % t.eval_every == 0 or step == t.steps
        if is_chief and log_now:
            hooks.log_metrics(
                {"train/loss": running_loss / running_count, "train/lr": scheduler.get_last_lr()[0]}, step=step
            )
            running_loss, running_count = 0.0, 0
        metrics: dict[str, float] = {}
        if is_chief and evaluate_now:
            metrics = validate()
            hooks.log_metrics(metrics, step=step)
        checkpoint_now = evaluate_now or (t.checkpoint_every and step % t.checkpoint_every == 0)
        if checkpoint_now:
            hooks.checkpoint(state(), step=step, metrics=metrics)

    loop_ended = time.perf_counter()
    train_seconds = loop_ended - loop_started
    final: dict[str, float] = {}
    if is_chief:
        probe(f"step-{step}")
        final = evaluate(
            _unwrap(model), dataset, dataset.indices("test"), prefix="test", batch_size=t.eval_batch_size, device=device
        )
        final["time/train_s"] = train_seconds
        final["time/gpu_s"] = train_seconds * (spec.train.gpus_per_job * world_size if on_gpu else 0.0)
        final["time/job_s"] = time.perf_counter() - started
        weights = artifacts / "model.pt"
        torch.save(_unwrap(model).state_dict(), weights)
        hooks.log_artifact(weights, "checkpoint")
        example = load_images(dataset, dataset.indices("test")[:2], torch.device("cpu"), model).numpy()
        hooks.log_model(_unwrap(model), input_example=example, metrics=final, step=step)
    return TrainingResult(
        steps=step,
        train_seconds=train_seconds,
        final_metrics=final,
        val_history=val_history,
        setup_seconds=loop_started - started,
        finish_seconds=time.perf_counter() - loop_ended,
    )
