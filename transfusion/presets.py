"""Named grids a user can run by name: ``transfusion run demo``.

Each preset is a function returning the grid as plain data, validated like a grid
file; the paper-scale presets name their dataset and expect its ``dataset_source``
(``--set dataset_source=...`` or a grid file) on real data.
"""

from __future__ import annotations

from collections.abc import Callable

from transfusion.registry import Registry

PRESETS: Registry[Callable[[], dict]] = Registry("grid preset")

PAPER_MODELS = ["resnet50", "inception_v3", "cbr-large-tall", "cbr-large-wide", "cbr-small", "cbr-tiny"]
PAPER_INITS = ["random", "imagenet", "mean-var"]


@PRESETS.register("smoke")
def smoke_grid() -> dict:
    """Seconds-long grid for tests: one tiny model, two seeds, a few steps."""
    return {
        "name": "smoke",
        "dataset": "synthetic-retina",
        "dataset_options": {"train": 240, "val": 64, "test": 64},
        "models": ["cbr-tiny"],
        "inits": ["random"],
        "data_sizes": [160],
        "seeds": [0, 1],
        "train": {
            "steps": 6,
            "batch_size": 16,
            "eval_every": 3,
            "resolution": 32,
            "probe_size": 32,
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
            "steps": 150,
            "batch_size": 32,
            "lr": 2e-3,
            "eval_every": 25,
            "resolution": 40,
            "probe_size": 128,
            "val_limit": 400,
        },
    }
