"""GPU efficiency: model FLOPs utilisation of the big models, and small jobs sharing one GPU.

    python tests/benchmarks/bench_gpu.py [--resolution 587] [--no-write]
    python tests/benchmarks/bench_gpu.py --device cpu --quick --no-write   # a dry run of the script

1. The card's bf16 matmul peak, measured here (best of square matmuls), is the baseline.
2. ResNet-50 and Inception-v3 training steps (forward, backward, SGD step) at the paper's
   retina resolution, bf16 autocast, channels_last, random inputs already on the GPU (the
   loader is measured in bench_loader.py): images/s, then MFU = images/s x training FLOPs
   per image (3 x the forward FLOPs of :func:`transfusion.cost.forward_flops`) / peak.
   Goal: >= 35 %.
3. CBR-Small jobs sharing one GPU: k processes train side by side for the same wall time;
   aggregate images/s with 4 processes / images/s of one alone. Goal: >= 2x.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.common import machine_info, write_section  # noqa: E402


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_matmul_peak(device, sizes: tuple[int, ...], repeats: int) -> float:
    """Best measured bf16 matmul rate on ``device``, in FLOP/s."""
    import torch

    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return best


def training_rate(
    name: str, *, device, resolution: int, batch: int, steps: int, compile_model: bool
) -> tuple[float, float]:
    """(images/s, training FLOPs per image) of ``name``'s training step on random inputs."""
    import torch

    from transfusion.cost import forward_flops
    from transfusion.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=3)
    flops = 3 * forward_flops(model, in_channels=3, resolution=resolution)
    model = model.to(device=device, memory_format=torch.channels_last).train()
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, 5), device=device).float()
    with_aux = hasattr(model, "forward_with_aux") and not compile_model

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            if with_aux:
                logits, aux = model.forward_with_aux(x)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
                if aux is not None:
                    loss = loss + 0.4 * torch.nn.functional.binary_cross_entropy_with_logits(aux.float(), y)
            else:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(step_model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: cuDNN autotuning, compilation
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - started), float(flops)


def _shared_worker(device_name: str, resolution: int, batch: int, seconds: float, start, results) -> None:
    import torch

    from transfusion.models import create_model

    device = torch.device(device_name)
    model = create_model("cbr-small", num_classes=5).to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, 5), device=device).float()

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    _sync(device)
    start.wait()  # every process starts timing together
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        done += 1
    _sync(device)
    results.put(done * batch / (time.perf_counter() - started))


def shared_rate(processes: int, *, device_name: str, resolution: int, batch: int, seconds: float) -> float:
    """Aggregate CBR-Small training images/s of ``processes`` jobs on one device."""
    context = mp.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_shared_worker, args=(device_name, resolution, batch, seconds, start, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    rates = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(rates)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=587, help="the paper's retina resolution")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--share", type=int, default=4, help="CBR-Small jobs sharing the device")
    parser.add_argument("--share-seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the card")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here (use --device cpu --quick for a dry run)")
    device = torch.device(args.device)
    if args.quick:
        args.resolution, args.batch, args.steps, args.share_seconds = 96, 4, 2, 2.0
    sizes, repeats = ((256,), 2) if args.quick else ((4096, 8192, 16384), 20)
    cbr_resolution = 64 if args.quick else 224

    peak = bf16_matmul_peak(device, sizes, repeats)
    rows = []
    for name in ("resnet50", "inception_v3"):
        modes = [False, True] if args.compile else [False]
        for compiled in modes:
            rate, flops = training_rate(
                name, device=device, resolution=args.resolution, batch=args.batch, steps=args.steps,
                compile_model=compiled,
            )  # fmt: skip
            label = f"{name}{' (torch.compile)' if compiled else ''}"
            achieved = rate * flops
            rows.append(f"| {label} | {rate:.1f} | {flops / 1e9:.1f} | {achieved / 1e12:.1f} | {achieved / peak:.1%} |")
            print(rows[-1], flush=True)
    sharing = {"device_name": args.device, "resolution": cbr_resolution, "batch": args.batch}
    alone = shared_rate(1, seconds=args.share_seconds, **sharing)
    together = shared_rate(args.share, seconds=args.share_seconds, **sharing)
    table = "\n".join(rows)
    command = f"python tests/benchmarks/bench_gpu.py --resolution {args.resolution} --batch {args.batch}"
    command += " --compile" if args.compile else ""
    quick_note = "(--quick: tiny sizes, a dry run of the script, not a measurement of the card)" if args.quick else ""
    peak_text = f"**{peak / 1e12:.1f} TFLOP/s** (best of square matmuls, sizes {', '.join(map(str, sizes))})"
    step_text = f"{args.resolution} px, batch {args.batch}, bf16 autocast, channels_last, SGD"
    share_text = f"{cbr_resolution} px, batch {args.batch}, AdamW, {args.share_seconds:.0f} s each, separate processes"
    body = f"""Machine: {machine_info()}.
Command: `{command}` {quick_note}

Baseline: bf16 matmul peak measured here, {peak_text}.

Training step at {step_text}, random inputs on the device:

| model | images/s | training GFLOPs / image | TFLOP/s | MFU (÷ measured peak) |
|---|---:|---:|---:|---:|
{table}

Goal: MFU ≥ 35 %.

CBR-Small jobs sharing the device ({share_text}):

| jobs | aggregate images/s | ÷ one alone |
|---:|---:|---:|
| 1 | {alone:.0f} | 1.00 |
| {args.share} | {together:.0f} | {together / alone:.2f} |

Goal: ≥ 2× with 4 jobs.
"""
    print(body)
    if not args.no_write:
        write_section("GPU: model FLOPs utilisation and shared small jobs", body)


if __name__ == "__main__":
    main()
