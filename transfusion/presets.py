"""Named grids a user can run by name: ``transfusion run demo``.

Each preset is a function returning the grid as plain data, validated like a grid
file; the paper-scale presets name their dataset and expect its ``dataset_source``
(``--set dataset_source=...`` or a grid file) on real data.
"""

from __future__ import annotations

from collections.abc import Callable

from transfusion.registry import Registry

PRESETS: Registry[Callable[[], dict]] = Registry("grid preset")

PAPER_MODELS = ["resnet50", "inception-v3", "cbr-large-tall", "cbr-large-wide", "cbr-small", "cbr-tiny"]
PAPER_INITS = ["random", "imagenet", "mean-var"]
# Figure 5's grids share one absolute threshold so their steps-to-threshold compare.
FIGURE5_CONVERGENCE = {"convergence_threshold": 0.91, "convergence_mode": "absolute"}


@PRESETS.register("smoke")
def smoke_grid() -> dict:
    """Seconds-long grid for tests: one tiny model, two seeds, a few steps."""
    return {
        "name": "smoke",
        "dataset": "synthetic-retina",
        # val/resolution/probe_size: enough unpooled (image, position) rows for 10 per
        # channel at cbr-tiny's top stage (256 channels, 4 x 4 at 64 px).
        "dataset_options": {"train": 240, "val": 160, "test": 64},
        "models": ["cbr-tiny"],
        "inits": ["random"],
        "data_sizes": [160],
        "seeds": [0, 1],
        # One job at a time: a second concurrent job is a second Ray Train run, whose actor
        # processes cost more CPU to start than a seconds-long job costs to train.
        "max_concurrent": 1,
        "train": {
            "steps": 6,
            "batch_size": 16,
            "eval_every": 3,
            "resolution": 64,
            "probe_size": 160,
            "eval_batch_size": 64,
        },
    }


@PRESETS.register("demo")
def demo_grid() -> dict:
    """The README demo: two CBR nets x random / synthetic-source transfer / mean-var x 2 seeds."""
    return {
        "name": "demo",
        "dataset": "synthetic-retina",
        "models": ["cbr-tiny", "cbr-small"],
        "inits": ["random", "imagenet", "mean-var"],
        "pretrained": "synthetic",
        "data_sizes": ["full"],
        "seeds": [0, 1],
        "train": {
            "steps": 120,
            "batch_size": 32,
            "lr": 2e-3,
            "eval_every": 20,
            "resolution": 40,
            # stage3 has 256 channels on 3 x 3 positions: 2 560 rows need 285+ images.
            "probe_size": 320,
            "val_limit": 400,
        },
    }


def _paper_train(resolution: int, *, steps: int, gpus: float) -> dict:
    return {
        "steps": steps,
        "batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.02,
        "warmup_steps": 500,
        "eval_every": 1000,
        "checkpoint_every": 1000,
        "resolution": resolution,
        "val_limit": 5000,
        "probe_size": 256,
        "cpus_per_job": 4,
        "gpus_per_job": gpus,
    }


@PRESETS.register("full-grid")
def full_grid() -> dict:
    """Table 1: six models x random / ImageNet / Mean-Var x full and 5 000 images x 3 seeds, retina.

    CBR nets have no published ImageNet weights: ``pretrained: imagenet`` resolves them to
    ``models:/transfusion-<model>-imagenet/latest``, made once by ``transfusion pretrain
    --model <model> --pretrained s3://.../imagenet`` (ResNet-50 and Inception-v3 use
    torchvision's IMAGENET1K_V1).
    """
    return {
        "name": "full-grid",
        "dataset": "retina-eyepacs",
        "dataset_source": "s3://transfusion-data/eyepacs",
        "models": PAPER_MODELS,
        "inits": PAPER_INITS,
        "pretrained": "imagenet",
        "data_sizes": ["full", 5000],
        "seeds": 3,
        "train": _paper_train(587, steps=30000, gpus=1.0),
    }


@PRESETS.register("full-grid-chexpert")
def full_grid_chexpert() -> dict:
    """Table 2: the CheXpert grid, five pathologies, 224 px."""
    return {
        "name": "full-grid-chexpert",
        "dataset": "chexpert",
        "dataset_source": "s3://transfusion-data/chexpert",
        "dataset_options": {"uncertainty": "u-ones", "frontal_only": True},
        "models": PAPER_MODELS,
        "inits": PAPER_INITS,
        "pretrained": "imagenet",
        "data_sizes": ["full"],
        "seeds": 3,
        # At 224 px Inception-v3's stage4 is 5 x 5: 20 480 rows need 820+ probe images.
        "train": {**_paper_train(224, steps=30000, gpus=1.0), "probe_size": 1024},
    }


@PRESETS.register("low-data")
def low_data_grid() -> dict:
    """Table 3: 5 000 retina images, where transfer helps ResNet-50 but hardly the CBRs."""
    return {
        "name": "low-data",
        "dataset": "retina-eyepacs",
        "dataset_source": "s3://transfusion-data/eyepacs",
        "models": ["resnet50", "cbr-large-tall", "cbr-large-wide"],
        "inits": ["random", "imagenet"],
        "pretrained": "imagenet",
        "data_sizes": [5000],
        "seeds": 3,
        "train": _paper_train(587, steps=10000, gpus=1.0),
    }


@PRESETS.register("convergence")
def convergence_grid() -> dict:
    """Figure 5: convergence of ResNet-50 by init, weight transfusion(k) and Gabor conv1."""
    return {
        "name": "convergence",
        "dataset": "retina-eyepacs",
        "dataset_source": "s3://transfusion-data/eyepacs",
        "models": ["resnet50"],
        "inits": [
            "random",
            "imagenet",
            "mean-var",
            "gabor",
            {"name": "transfusion", "options": {"k": 0}},
            {"name": "transfusion", "options": {"k": 1}},
            {"name": "transfusion", "options": {"k": 2}},
            {"name": "transfusion", "options": {"k": 3}},
        ],  # fmt: skip
        "pretrained": "imagenet",
        "data_sizes": ["full"],
        "seeds": 3,
        "train": {**_paper_train(587, steps=20000, gpus=1.0), "eval_every": 500},
        **FIGURE5_CONVERGENCE,
    }


@PRESETS.register("convergence-slim")
def convergence_slim_grid() -> dict:
    """Figure 5's slim model: ResNet-50 pretrained up to stage 2, a thin random top."""
    return {
        "name": "convergence-slim",
        "dataset": "retina-eyepacs",
        "dataset_source": "s3://transfusion-data/eyepacs",
        "models": ["slim-resnet50"],
        "inits": ["random", {"name": "transfusion", "options": {"k": 2}}],
        "pretrained": "imagenet",
        "data_sizes": ["full"],
        "seeds": 3,
        "train": {**_paper_train(587, steps=20000, gpus=0.5), "eval_every": 500},
        **FIGURE5_CONVERGENCE,
    }


@PRESETS.register("sources")
def sources_grid() -> dict:
    """Beyond the paper: which pre-training helps ResNet-50 on CheXpert in 2026.

    Random init against supervised ImageNet (torchvision V1), self-supervised ImageNet
    (DINO) and a radiology source (RadImageNet), at full data, 5 000 and 1 000 images.
    """
    return {
        "name": "sources",
        "dataset": "chexpert",
        "dataset_source": "s3://transfusion-data/chexpert",
        "dataset_options": {"uncertainty": "u-ones", "frontal_only": True},
        "models": ["resnet50"],
        "inits": ["random", "transfer", "mean-var"],
        "pretrained": ["torchvision-resnet50-imagenet1k-v1", "dino-resnet50", "radimagenet-resnet50"],
        "data_sizes": ["full", 5000, 1000],
        "seeds": 3,
        "train": {**_paper_train(224, steps=30000, gpus=1.0), "probe_size": 512},
    }


@PRESETS.register("sources-cpu")
def sources_cpu_grid() -> dict:
    """The ``sources`` question at CPU size, offline: a natural-image-like source (procedural
    shapes) against a medical-domain one (procedural chest x-rays), each pretrained once,
    transferred to the synthetic retina task."""
    return {
        "name": "sources-cpu",
        "dataset": "synthetic-retina",
        "models": ["cbr-tiny"],
        "inits": ["random", "transfer", "mean-var"],
        "pretrained": ["synthetic", "domain:synthetic-chest"],
        "data_sizes": ["full", 200],
        "seeds": [0, 1],
        "train": {"steps": 120, "batch_size": 32, "lr": 2e-3, "eval_every": 40, "resolution": 64, "probe_size": 160},
    }


# Neyshabur et al. 2020, Fig. 2: block sizes from none (images as they are) down to pixel shuffle.
WHAT_TRANSFERS_BLOCKS = ["none", 56, 16, 4, 1]


@PRESETS.register("what-transfers")
def what_transfers_grid() -> dict:
    """What is transferred? ResNet-50 on CheXpert, random vs ImageNet transfer, on images whose
    blocks are shuffled (none, 56, 16, 4, 1 px), full data and 5 000 images, 3 seeds."""
    return {
        "name": "what-transfers",
        "dataset": "chexpert",
        "dataset_source": "s3://transfusion-data/chexpert",
        "dataset_options": {"uncertainty": "u-ones", "frontal_only": True},
        "models": ["resnet50"],
        "inits": ["random", "imagenet"],
        "pretrained": "imagenet",
        "data_sizes": ["full", 5000],
        "block_shuffle": WHAT_TRANSFERS_BLOCKS,
        "seeds": 3,
        "train": {**_paper_train(224, steps=30000, gpus=1.0), "probe_size": 512},
    }


@PRESETS.register("what-transfers-cpu")
def what_transfers_cpu_grid() -> dict:
    """``what-transfers`` at CPU size, offline: cbr-tiny on synthetic retina at 48 px, random vs
    transfer from the procedural source, blocks none / 8 / 4 / 1 px, 2 seeds (16 short jobs)."""
    return {
        "name": "what-transfers-cpu",
        "dataset": "synthetic-retina",
        # 48 px, not 32: cbr-tiny's top stage is then 3 x 3, so 320 probe images give 10 rows per channel.
        "dataset_options": {"train": 400, "val": 320, "test": 200},
        "models": ["cbr-tiny"],
        "inits": ["random", "imagenet"],
        "pretrained": "synthetic",
        "data_sizes": ["full"],
        "block_shuffle": ["none", 8, 4, 1],
        "seeds": [0, 1],
        "train": {
            "steps": 40,
            "batch_size": 32,
            "lr": 2e-3,
            "eval_every": 20,
            "resolution": 48,
            "probe_size": 320,
            "val_limit": 160,
        },
        # One pair per kind and block size (12 pairs, not 16): the grid stays within 10 minutes on 2 cores.
        "interpolation_pairs": 1,
    }
