"""What a grid will cost before anything starts: jobs, training FLOPs, device hours, disk and price.

:func:`plan_grid` reads only the grid (and, when given, where its jobs stand); nothing is
trained, prepared or started. Every estimate says what it is computed from:

- FLOPs: :func:`transfusion.cost.forward_flops` on a model built on PyTorch's ``meta``
  device (shapes only, no arithmetic), x3 for forward + backward, x steps x batch size.
  Training steps only: validation, probes and the test pass are not counted. The first
  layer is counted at 3 input channels (a 1-channel set costs well under 1 % less).
- Hours: training FLOPs / effective throughput of the device. Effective throughput is
  *measured* where ``BENCHMARKS.md`` has a figure for the model on that device
  (:data:`MEASURED`), else *assumed*: the card's dense bf16 peak x :data:`ASSUMED_GPU_UTILISATION`,
  or on CPUs the mean per-core figure of the measured models.
- Disk: the probes (step 0 and last, fp16, the rows :mod:`transfusion.probes` keeps), the
  checkpoints (the latest two training states and the final weights, fp32) and each node's
  copy of the prepared dataset (uint8 images; known once the dataset is prepared here).
- Price: device-hours x a list price per device-hour (:data:`DEVICES`, USD, on-demand,
  rounded; ``--price-per-hour`` overrides it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from transfusion.config import GridSpec, JobSpec
from transfusion.grid_status import GridStatus, JobState

# The MFU goal bench_gpu.py checks (BENCHMARKS.md, "GPU"): no card has been measured yet.
ASSUMED_GPU_UTILISATION = 0.35
# Training states JobCheckpoints keeps per job, and optimiser slots per weight.
KEPT_STATES = 2
OPTIMIZER_SLOTS = {"adam": 2, "sgd": 1}
PROBES_PER_JOB = 2  # step 0 and the last step
FP16_BYTES, FP32_BYTES, ROW_INDEX_BYTES = 2, 4, 3 * 4


@dataclass(frozen=True)
class Device:
    """A device kind a grid can be priced on; a GPU's figures are per card, a CPU's per core."""

    name: str
    description: str
    peak_flops: float  # dense bf16 tensor peak per card (GPUs); 0 for CPUs (measured per core instead)
    price_per_hour: float  # USD per card-hour, or per core-hour for ``cpu``

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"


DEVICES = {
    device.name: device
    for device in (
        Device("a100", "NVIDIA A100 (312 TFLOP/s dense bf16)", 312e12, 2.00),
        Device("h100", "NVIDIA H100 SXM (989 TFLOP/s dense bf16)", 989e12, 3.50),
        Device("l4", "NVIDIA L4 (121 TFLOP/s dense bf16)", 121e12, 0.80),
        Device("a10g", "NVIDIA A10G (about 70 TFLOP/s dense bf16; AWS's figure)", 70e12, 1.00),
        Device("cpu", "CPU cores (x86, torch threads = cores)", 0.0, 0.05),
    )
}


@dataclass(frozen=True)
class Measurement:
    """A training throughput from BENCHMARKS.md: images/s of ``model`` at ``resolution`` on ``devices`` units."""

    device: str
    model: str
    resolution: int
    images_per_s: float
    devices: float
    where: str


MEASURED = (
    Measurement("cpu", "cbr-small", 224, 7.9, 2, "BENCHMARKS.md 'Loader vs model', 2 AMD EPYC cores, 2026-11-25"),
    Measurement("cpu", "resnet50", 224, 5.9, 2, "BENCHMARKS.md 'Loader vs model', 2 AMD EPYC cores, 2026-11-25"),
)


@dataclass(frozen=True)
class Throughput:
    """Training FLOP/s one device unit (a card, a core) sustains for a model, and how it is known."""

    flops_per_s: float
    measured: bool
    basis: str


@dataclass(frozen=True)
class ModelCost:
    """One model at the grid's resolution: what one image costs and what a job stores."""

    forward_flops: int
    parameters: int
    probe_bytes: int  # one stored probe


@dataclass(frozen=True)
class JobCost:
    spec: JobSpec
    train_flops: float
    devices: float  # cards or cores the job holds
    hours: float  # wall hours on those devices
    throughput: Throughput

    @property
    def device_hours(self) -> float:
        return self.hours * self.devices


@dataclass(frozen=True)
class DiskEstimate:
    probes_bytes: int
    checkpoints_bytes: int
    node_cache_bytes: int | None  # per node; None until the dataset is prepared here
    node_cache_basis: str


@dataclass(frozen=True)
class GridPlan:
    grid: GridSpec
    device: Device
    price_per_hour: float
    price_overridden: bool
    jobs: tuple[JobCost, ...]
    disk: DiskEstimate
    status: GridStatus | None  # None: no tracking server to ask
    status_note: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_flops(self) -> float:
        return sum(job.train_flops for job in self.jobs)

    @property
    def device_hours(self) -> float:
        return sum(job.device_hours for job in self.jobs)

    @property
    def pending_jobs(self) -> tuple[JobCost, ...]:
        if self.status is None:
            return self.jobs
        pending = {s.spec.job_key for s in self.status.jobs if s.state is not JobState.FINISHED}
        return tuple(job for job in self.jobs if job.spec.job_key in pending)

    @property
    def price(self) -> float:
        return self.device_hours * self.price_per_hour


def model_cost(model: str, *, resolution: int, probe_size: int, rows_per_channel: int) -> ModelCost:
    """FLOPs, parameters and probe size of ``model`` at ``resolution``, from a shapes-only (meta) pass."""
    import torch

    from transfusion.cost import forward_flops
    from transfusion.models import count_parameters, create_model

    with torch.device("meta"):
        net = create_model(model, num_classes=1, in_channels=3)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name, module in net.capture_modules().items()
    ]
    try:
        flops = forward_flops(net, in_channels=3, resolution=resolution)
    finally:
        for handle in handles:
            handle.remove()
    return ModelCost(flops, count_parameters(net), probe_bytes(shapes, probe_size, rows_per_channel))


def probe_bytes(shapes: dict[str, tuple[int, ...]], images: int, rows_per_channel: int) -> int:
    """Bytes of one stored probe: conv maps keep ``ceil(rows_per_channel x C / images)`` positions per image."""
    total = 0
    for shape in shapes.values():
        if len(shape) == 4:
            _, channels, height, width = shape
            rows = min(math.ceil(rows_per_channel * channels / max(images, 1)), height * width) * images
            total += rows * (channels * FP16_BYTES + ROW_INDEX_BYTES)
        else:
            total += images * shape[-1] * FP16_BYTES
    return total


def throughput_for(device: Device, model: str, costs: dict[tuple[str, int], ModelCost]) -> Throughput:
    """Training FLOP/s per device unit: a measurement of the model if there is one, else assumed."""
    if device.is_gpu:
        measured = [m for m in MEASURED if m.device == device.name and m.model == model]
    else:
        measured = [m for m in MEASURED if m.device == "cpu" and m.model == model]
    if measured:
        m = measured[0]
        rate = m.images_per_s * 3 * costs[m.model, m.resolution].forward_flops / m.devices
        return Throughput(rate, True, f"measured: {m.images_per_s} images/s at {m.resolution} px ({m.where})")
    if device.is_gpu:
        rate = device.peak_flops * ASSUMED_GPU_UTILISATION
        return Throughput(rate, False, f"assumed: {ASSUMED_GPU_UTILISATION:.0%} of the dense bf16 peak")
    cpu = [m for m in MEASURED if m.device == "cpu"]
    rate = sum(m.images_per_s * 3 * costs[m.model, m.resolution].forward_flops / m.devices for m in cpu) / len(cpu)
    return Throughput(rate, False, f"assumed: mean per-core rate measured for {', '.join(m.model for m in cpu)}")


def devices_per_job(spec: JobSpec, device: Device) -> float:
    """Cards (at least one: a GPU plan of a CPU grid runs each job on a card) or cores a job holds."""
    workers = spec.train.num_workers
    if device.is_gpu:
        return (spec.train.gpus_per_job or 1.0) * workers
    return spec.train.cpus_per_job * workers


def node_cache_estimate(grid: GridSpec, home: Path | None) -> tuple[int | None, str]:
    """Bytes of the prepared dataset at the grid's resolution on each node, if it is prepared under ``home``."""
    import numpy as np

    per_image = grid.train.resolution**2 * 3
    if home is not None:
        for images in sorted((home / "data" / grid.dataset).glob("*/images.npy")):
            try:
                array = np.load(images, mmap_mode="r")
            except (OSError, ValueError):
                continue
            if array.ndim == 4 and array.shape[1] == grid.train.resolution:
                return int(array.nbytes), f"{array.shape[0]} prepared images at {array.shape[1]} px"
    return (
        None,
        f"unknown until the dataset is prepared ({per_image / 1e6:.2f} MB per RGB image at {grid.train.resolution} px)",
    )


def plan_grid(
    grid: GridSpec,
    *,
    device: str,
    price_per_hour: float | None = None,
    status: GridStatus | None = None,
    status_note: str = "",
    home: Path | None = None,
) -> GridPlan:
    """The plan of ``grid`` on ``device`` (a key of :data:`DEVICES`); ``status`` says which jobs are done."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if price_per_hour is not None and not (math.isfinite(price_per_hour) and price_per_hour >= 0):
        raise ValueError(f"price per hour must be a number >= 0, got {price_per_hour}")
    target = DEVICES[device]
    t = grid.train
    needed = {(m, t.resolution) for m in grid.models} | {(m.model, m.resolution) for m in MEASURED}
    costs = {
        (model, res): model_cost(
            model, resolution=res, probe_size=t.probe_size, rows_per_channel=t.probe_rows_per_channel
        )
        for model, res in sorted(needed)
    }
    jobs = []
    for spec in grid.jobs():
        cost = costs[spec.model, t.resolution]
        flops = 3.0 * cost.forward_flops * t.steps * t.batch_size
        rate = throughput_for(target, spec.model, costs)
        units = devices_per_job(spec, target)
        jobs.append(JobCost(spec, flops, units, flops / (rate.flops_per_s * units) / 3600, rate))
    states = KEPT_STATES * (1 + OPTIMIZER_SLOTS[t.optimizer]) + 1  # + the final weights
    cache_bytes, cache_basis = node_cache_estimate(grid, home)
    disk = DiskEstimate(
        probes_bytes=sum(PROBES_PER_JOB * costs[j.spec.model, t.resolution].probe_bytes for j in jobs),
        checkpoints_bytes=sum(states * costs[j.spec.model, t.resolution].parameters * FP32_BYTES for j in jobs),
        node_cache_bytes=cache_bytes,
        node_cache_basis=cache_basis,
    )
    notes = []
    if target.is_gpu and t.gpus_per_job == 0:
        notes.append(f"the grid asks for 0 GPUs per job (resolved here); priced at 1 {device} per job")
    return GridPlan(
        grid=grid,
        device=target,
        price_per_hour=target.price_per_hour if price_per_hour is None else price_per_hour,
        price_overridden=price_per_hour is not None,
        jobs=tuple(jobs),
        disk=disk,
        status=status,
        status_note=status_note,
        notes=tuple(notes),
    )


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _bytes(value: float) -> str:
    return _si(value, "B")


def format_plan(plan: GridPlan) -> str:
    """The plan as a user reads it: the resolved grid, the counts, cost per model and in total, disk, price."""
    import yaml

    grid, device = plan.grid, plan.device
    unit = "card" if device.is_gpu else "core"
    lines = [
        f"Plan of grid {grid.name} on {device.name}: {device.description}",
        "",
        "Resolved grid (every default filled in):",
    ]
    resolved = yaml.safe_dump(grid.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=110)
    lines += ["  " + line for line in resolved.rstrip().splitlines()]
    lines.append("")
    total = len(plan.jobs)
    if plan.status is None:
        lines.append(f"Jobs: {total} in total; finished: unknown ({plan.status_note or 'no tracking server'})")
    else:
        done = plan.status.count(JobState.FINISHED)
        lines.append(
            f"Jobs: {total} in total, {done} already finished, {total - done} pending ({plan.status.counts_line})"
        )
        reasons: dict[str, int] = {}
        for job in plan.status.jobs:
            if job.state is not JobState.FINISHED:
                reasons[job.reason] = reasons.get(job.reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1])[:8]:
            lines.append(f"  not finished, {reason}: {count}")
    lines += ["", f"| model | jobs | train FLOPs per job | {unit}s per job | hours per job | throughput per {unit} |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    by_model: dict[str, list[JobCost]] = {}
    for job in plan.jobs:
        by_model.setdefault(job.spec.model, []).append(job)
    for model, jobs in by_model.items():
        job = jobs[0]
        lines.append(
            f"| {model} | {len(jobs)} | {_si(job.train_flops, 'FLOP')} | {job.devices:g} | {job.hours:.2f} | "
            f"{_si(job.throughput.flops_per_s, 'FLOP/s')} ({job.throughput.basis}) |"
        )
    pending = plan.pending_jobs
    pending_hours = sum(j.device_hours for j in pending)
    lines += [
        "",
        f"Training FLOPs: {_si(plan.total_flops, 'FLOP')} in total (training steps only: 3 x forward FLOPs x "
        f"{grid.train.steps} steps x batch {grid.train.batch_size}; validation, probes and test not counted)",
        f"Estimate: {plan.device_hours:.1f} {device.name} {unit}-hours for all {total} jobs; "
        f"{pending_hours:.1f} for the {len(pending)} "
        + ("pending" if plan.status is not None else "(finished unknown)")
        + " jobs"
        + (
            ""
            if all(j.throughput.measured for j in plan.jobs)
            else "; rows marked assumed were not measured on this device"
        ),
        f"Price: ${plan.price:,.0f} for all jobs, ${pending_hours * plan.price_per_hour:,.0f} for those pending, "
        f"at ${plan.price_per_hour:.2f} per {unit}-hour ("
        + ("--price-per-hour" if plan.price_overridden else "default list price; --price-per-hour overrides")
        + ")",
        f"Disk: probes {_bytes(plan.disk.probes_bytes)} (MLflow artifacts), checkpoints up to "
        f"{_bytes(plan.disk.checkpoints_bytes)} (storage path: {KEPT_STATES} training states + final weights per job), "
        "node cache "
        + (f"{_bytes(plan.disk.node_cache_bytes)} per node " if plan.disk.node_cache_bytes is not None else "")
        + f"({plan.disk.node_cache_basis})",
    ]
    if plan.status is not None and plan.status.spent_device_s:
        finished = [j for j in plan.status.of(JobState.FINISHED) if j.run and j.run.device_s]
        estimate = sum(j.device_hours for j in plan.jobs if j.spec.job_key in {s.spec.job_key for s in finished})
        lines.append(
            f"Spent: {plan.status.spent_device_s / 3600:.2f} device-hours logged by {len(finished)} finished jobs "
            f"(time/device_s, on the devices they ran on), against {estimate:.2f} {device.name} {unit}-hours estimated "
            "for the same jobs"
        )
    for note in plan.notes:
        lines.append(f"Note: {note}")
    return "\n".join(lines)


def plan_rows(plan: GridPlan) -> list[dict[str, object]]:
    """The plan as table rows (one per model), for a Prefect table artifact."""
    rows = []
    for model in plan.grid.models:
        jobs = [j for j in plan.jobs if j.spec.model == model]
        pending = {j.spec.job_key for j in plan.pending_jobs}
        rows.append({
            "model": model,
            "jobs": len(jobs),
            "pending": sum(j.spec.job_key in pending for j in jobs),
            "train_flops_per_job": f"{jobs[0].train_flops:.3g}",
            "device": plan.device.name,
            "device_hours": round(sum(j.device_hours for j in jobs), 2),
            "throughput": jobs[0].throughput.basis,
            "price_usd": round(sum(j.device_hours for j in jobs) * plan.price_per_hour, 2),
        })  # fmt: skip
    return rows


def local_device() -> str:
    """The :data:`DEVICES` key of this machine's first CUDA card (by name; a card not in the table is
    priced as an A100), else ``cpu``."""
    from transfusion.config import cuda_device_count

    if not cuda_device_count():
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(0).lower()
    for key in ("h100", "a100", "a10g", "l4"):
        if key in name:
            return key
    return "a100"


def since(ms: int | None) -> str:
    """A tracking timestamp (ms since the epoch) as a UTC date and minute."""
    if ms is None:
        return "never"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
