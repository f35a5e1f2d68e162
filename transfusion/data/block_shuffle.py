"""Block shuffling (Neyshabur, Sedghi & Zhang, NeurIPS 2020, "What is being transferred
in transfer learning?", section 3.1): each image is cut into ``block`` x ``block`` pixel
blocks and the blocks are moved by one fixed permutation of block positions.

Layout: a normalised (N, C, H, W) batch in, the same shape out. The permutation is a
pure function of (``block``, H, W, ``seed``): every image, split (train/val/test/probe),
init and seed of a grid sees the same one, so block shuffling changes the *task*, not
the noise between runs. Pixels inside a block keep their order; ``block`` = 1 is a pixel
shuffle, ``block`` = H = W (or :data:`NO_SHUFFLE`) leaves the image as it is.

H and W must be multiples of ``block``: a remainder strip would stay in place and carry
the unshuffled layout the experiment removes, so it is refused (the grid refuses it
when validated, naming the resolution).
"""

from __future__ import annotations

import numpy as np
import torch

# The grid value that means "no shuffle"; kept out of job keys so earlier jobs keep theirs.
NO_SHUFFLE = "none"

# One permutation per (block, H, W) for every grid: a job's results depend on its key alone.
BLOCK_SHUFFLE_SEED = 0


def block_permutation(*, block: int, height: int, width: int, seed: int = BLOCK_SHUFFLE_SEED) -> np.ndarray:
    """The permutation of the (height // block) * (width // block) block positions, row-major.

    Output block ``i`` is input block ``perm[i]``.
    """
    check_block(block, height=height, width=width)
    blocks = (height // block) * (width // block)
    # The seed list keeps the stream distinct per geometry (a 4-block and a 16-block
    # permutation are not prefixes of one stream).
    return np.random.default_rng([seed, block, height, width]).permutation(blocks)


def check_block(block: int, *, height: int, width: int) -> None:
    """Raise a ValueError unless ``block`` is a positive int dividing both sides."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block_shuffle: block size must be a positive int or {NO_SHUFFLE!r}, got {block!r}")
    if height % block or width % block:
        raise ValueError(
            f"block_shuffle: block size {block} does not divide the {height} x {width} images; "
            f"pick a divisor of the resolution (or {NO_SHUFFLE!r})"
        )


def block_shuffle(images: torch.Tensor, *, block: int, seed: int = BLOCK_SHUFFLE_SEED) -> torch.Tensor:
    """``images`` (N, C, H, W) with their ``block`` x ``block`` blocks permuted by one fixed permutation.

    Runs on the tensor's device (a gather, no copy of the data set). Returns the input
    itself when there is one block.
    """
    if images.ndim != 4:
        raise ValueError(f"block_shuffle: expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    perm = block_permutation(block=block, height=h, width=w, seed=seed)
    if len(perm) == 1:
        return images
    rows, cols = h // block, w // block
    # (N, C, rows, b, cols, b) -> (N, C, rows*cols, b, b): one axis of block positions to permute.
    blocks = images.reshape(n, c, rows, block, cols, block).permute(0, 1, 2, 4, 3, 5)
    blocks = blocks.reshape(n, c, rows * cols, block, block)
    blocks = blocks[:, :, torch.from_numpy(perm).to(images.device)]
    out = blocks.reshape(n, c, rows, cols, block, block).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
    return out.contiguous(memory_format=torch.contiguous_format)
