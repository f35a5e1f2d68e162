"""Random streams of the procedural generators, each a pure function of integer keys.

Keys such as (seed, split, index, part) give every image its own independent streams, so
its scene and lesions do not depend on how other images were drawn.
"""

from __future__ import annotations

import numpy as np


def stream(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def derived_seed(*keys: int) -> int:
    """One integer seed drawn from ``keys`` (for a renderer that takes a seed)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
