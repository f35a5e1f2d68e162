"""Random streams of the procedural generators, each a pure function of integer keys.

Keys such as (seed, split, index, part) give every image its own independent streams, so
its scene and lesions do not depend on how other images were drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def stream(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def derived_seed(*keys: int) -> int:
    """One integer seed drawn from ``keys`` (for a renderer that takes a seed)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def render_split(
    render: Callable[[int, int, int], np.ndarray], shape: tuple[int, int, int], *, seed: int, split_id: int, count: int
) -> np.ndarray:
    """``count`` uint8 images of ``shape``; image i is ``render(i, scene_seed, lesion_seed)``.

    Its scene and lesion seeds are drawn from (seed, split_id, i, 1) and (.., 2): each
    image is a function of its own keys, whatever else the split holds.
    """
    images = np.empty((count, *shape), dtype=np.uint8)
    for i in range(count):
        images[i] = render(i, derived_seed(seed, split_id, i, 1), derived_seed(seed, split_id, i, 2))
    return images
