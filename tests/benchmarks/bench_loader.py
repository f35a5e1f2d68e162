"""Is reading prepared data fast enough to keep the model busy?

Measures images/s of the training loop's input path -- random batches from the
memory-mapped prepared images through ``transfusion.train.load_images`` and
``augment`` (batch 32, one process, as training does) -- at 224 and 587 px, against
images/s of training steps (forward + backward + Adam, channels_last) of CBR-Small and
ResNet-50 at 224 px on this machine's CPU. Writes the "## Loader vs model" section of
BENCHMARKS.md with ``--write``.

    .venv/bin/python tests/benchmarks/bench_loader.py --write
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from transfusion.data.prepared import PreparedDataset, PreparedDatasetWriter
from transfusion.models import create_model
from transfusion.train import augment, batch_indices, load_images

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.common import cpu_model, write_section  # noqa: E402

SECTION = "## Loader vs model"


def make_prepared(root: Path, *, resolution: int, count: int, seed: int = 0) -> PreparedDataset:
    """A prepared set of ``count`` synthetic RGB images (content does not affect speed)."""
    rng = np.random.default_rng(seed)
    with PreparedDatasetWriter(root, num_images=count, image_shape=(resolution, resolution, 3)) as writer:
        for start in range(0, count, 64):
            stop = min(count, start + 64)
            shape = (stop - start, resolution, resolution, 3)
            writer.images[start:stop] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        split = np.zeros(count, dtype=np.int8)
        split[-count // 10 :] = 1
        split[-count // 20 :] = 2
        return writer.finish(
            meta={
                "name": f"bench-{resolution}",
                "version": "bench",
                "resolution": resolution,
                "label_names": ["referable_dr"],
                "task": "binary",
                "augment": "fundus",
            },
            targets=(rng.random((count, 1)) < 0.3).astype(np.float32),
            split=split,
        )


def loader_images_per_s(dataset: PreparedDataset, *, batch_size: int, batches: int) -> float:
    """The training loop's input path, timed alone (after one warm-up pass over the file)."""
    pool = dataset.indices("train")
    device = torch.device("cpu")
    policy = dataset.meta["augment"]
    np.asarray(dataset.images[: len(pool)]).sum()  # page the file in, as a long run would have
    started = time.perf_counter()
    for step in range(batches):
        index = batch_indices(pool, seed=0, step=step, batch_size=batch_size)
        generator = torch.Generator().manual_seed(step)
        x = augment(load_images(dataset, index, device), policy=policy, generator=generator)
        x = x.contiguous(memory_format=torch.channels_last)
        torch.from_numpy(dataset.targets[index])
    return batches * batch_size / (time.perf_counter() - started)


def model_images_per_s(name: str, *, resolution: int, batch_size: int, steps: int) -> float:
    """Training steps of ``name`` on random inputs: forward, backward, Adam step."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=1, in_channels=3).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch_size, 1) < 0.3).float()

    def step() -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator and kernel selection
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-224", type=int, default=512)
    parser.add_argument("--images-587", type=int, default=256)
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--model-batch", type=int, default=16)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    loader: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for resolution, count in ((224, args.images_224), (587, args.images_587)):
            dataset = make_prepared(Path(tmp) / f"r{resolution}", resolution=resolution, count=count)
            loader[resolution] = loader_images_per_s(dataset, batch_size=32, batches=args.loader_batches)
            print(f"loader {resolution:>3} px, batch 32: {loader[resolution]:8.1f} images/s")
    models: dict[str, float] = {}
    for name in ("cbr-small", "resnet50"):
        models[name] = model_images_per_s(name, resolution=224, batch_size=args.model_batch, steps=args.model_steps)
        print(f"{name:>9} train step 224 px, batch {args.model_batch}: {models[name]:8.1f} images/s")

    fastest = max(models.values())
    rows = [
        "| measurement | images/s | loader 224 px ÷ this | loader 587 px ÷ this |",
        "|---|---:|---:|---:|",
        f"| loader, 224 px, batch 32 | {loader[224]:.0f} | | |",
        f"| loader, 587 px, batch 32 | {loader[587]:.0f} | | |",
    ]
    for name, speed in models.items():
        rows.append(
            f"| {name} train step, 224 px, batch {args.model_batch} | {speed:.1f} | "
            f"{loader[224] / speed:.0f}× | {loader[587] / speed:.1f}× |"
        )
    verdict = (
        f"The loader is not the bottleneck: at 224 px it reads {loader[224] / fastest:.0f}× faster "
        f"than the fastest model trains, i.e. about {100 * fastest / loader[224]:.1f} % of a "
        "training step; at 587 px it still outpaces both models at 224 px, and a model at "
        "587 px is another (587/224)² ≈ 7× slower."
        if loader[224] >= 5 * fastest and loader[587] >= fastest
        else "WARNING: the loader is within 5× of a model's training speed; it may be the "
        "bottleneck -- profile transfusion.train.load_images/augment."
    )
    body = "\n".join(
        [
            f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} CPUs "
            f"({cpu_model()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"no GPU; 1-minute load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after "
            "(other work on the machine lowers every figure; the ratios move less).",
            "",
            "Command: `.venv/bin/python tests/benchmarks/bench_loader.py --write`",
            "",
            "Loader: random training batches from the memory-mapped `images.npy` through "
            "`transfusion.train.load_images` + `augment` (fundus policy) + channels_last, one "
            f"process, file in the page cache ({args.images_224} images at 224 px, "
            f"{args.images_587} at 587 px). Model: forward + backward + Adam step, "
            "channels_last, random inputs, after one warm-up step.",
            "",
            *rows,
            "",
            verdict,
        ]
    )
    print()
    print(body)
    if args.write:
        write_section(SECTION.removeprefix("## "), body)
        print(f"\nwrote {SECTION!r} to {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
