"""Block shuffling: a fixed permutation of blocks, and a grid axis that keeps earlier jobs' keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfusion.config import JobSpec, load_grid
from transfusion.data.block_shuffle import block_permutation, block_shuffle
from transfusion.presets import PRESETS


def _images(n: int = 3, c: int = 3, size: int = 16) -> torch.Tensor:
    # Distinct values everywhere, so any moved pixel shows.
    return torch.arange(n * c * size * size, dtype=torch.float32).reshape(n, c, size, size)


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_shuffling_is_a_permutation_of_each_images_pixels(block):
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = block_shuffle(x, block=block)
    assert y.shape == x.shape and not torch.equal(y, x)
    for image in range(4):  # the pixel histogram of every image and channel is unchanged
        for channel in range(3):
            assert torch.equal(x[image, channel].flatten().sort().values, y[image, channel].flatten().sort().values)


def test_blocks_move_whole_and_the_same_way_in_every_image_and_channel():
    x = _images()
    y = block_shuffle(x, block=4)
    perm = block_permutation(block=4, height=16, width=16)
    for out_pos, in_pos in enumerate(perm):
        (r, c), (ri, ci) = divmod(out_pos, 4), divmod(int(in_pos), 4)
        moved = x[..., 4 * ri : 4 * ri + 4, 4 * ci : 4 * ci + 4]
        assert torch.equal(y[..., 4 * r : 4 * r + 4, 4 * c : 4 * c + 4], moved)


def test_block_of_the_image_size_is_the_identity():
    x = _images()
    assert torch.equal(block_shuffle(x, block=16), x)


def test_same_permutation_for_every_call_split_and_init_different_for_other_block_sizes():
    x = _images()
    # Train, validation and test batches are separate calls: the same block goes to the same place.
    assert torch.equal(block_shuffle(x[:1], block=2), block_shuffle(x, block=2)[:1])
    assert torch.equal(block_shuffle(x, block=2), block_shuffle(x.clone(), block=2))
    assert not torch.equal(block_shuffle(x, block=2), block_shuffle(x, block=4))
    assert not np.array_equal(block_permutation(block=2, height=16, width=16, seed=1),
                              block_permutation(block=2, height=16, width=16))  # fmt: skip


def test_block_that_does_not_divide_the_image_is_refused():
    with pytest.raises(ValueError, match="does not divide the 16 x 16"):
        block_shuffle(_images(), block=3)
    with pytest.raises(ValueError, match="positive int"):
        block_shuffle(_images(), block=0)


def _smoke(**update) -> dict:
    """The smoke grid as it was when the keys below were computed (before it ran one job at a time)."""
    smoke = {key: value for key, value in PRESETS.get("smoke")().items() if key != "max_concurrent"}
    return {**smoke, **update}


def test_unshuffled_jobs_keep_the_key_they_had_before_the_axis():
    grid = load_grid(_smoke())
    # Keys of the smoke grid computed before block_shuffle existed.
    assert grid.grid_key == "5b75f8b4a16daaf8"
    assert [job.job_key for job in grid.jobs()] == ["5e113baacb7fc70f", "ee000974d69031cd"]
    explicit = load_grid(_smoke(block_shuffle=["none"]))
    assert explicit.grid_key == grid.grid_key
    assert [j.job_key for j in explicit.jobs()] == [j.job_key for j in grid.jobs()]
    job = grid.jobs()[0]
    assert job.model_copy(update={"block_shuffle": "none"}).job_key == job.job_key
    assert job.legacy_job_keys == JobSpec.model_validate(job.model_dump(exclude={"block_shuffle"})).legacy_job_keys


def test_block_size_is_part_of_the_key_the_name_and_the_tags():
    from transfusion.tracking import job_params, job_tags

    grid = load_grid(_smoke(block_shuffle=["none", 16, 1]))
    jobs = grid.jobs()
    assert len(jobs) == 6 and len({j.job_key for j in jobs}) == 6
    assert grid.grid_key != load_grid(_smoke()).grid_key
    shuffled = next(j for j in jobs if j.block_shuffle == 16)
    assert shuffled.run_name == "cbr-tiny-random-160-b16-s0" and shuffled.legacy_job_keys == ()
    assert job_tags(shuffled)["block_shuffle"] == "16" and job_params(shuffled)["block_shuffle"] == "16"
    assert job_tags(jobs[0])["block_shuffle"] == "none" and "block_shuffle" not in job_params(jobs[0])


@pytest.mark.parametrize(
    ("blocks", "message"),
    [([3], "does not divide train.resolution 64"), ([128], "does not divide"), ([4, 4], "listed twice"),
     (["none", 64], "repeats 'none'"), ([0], "greater than or equal to 1"), (["all"], "block_shuffle")],
)  # fmt: skip
def test_bad_block_sizes_are_refused_with_one_line(blocks, message):
    with pytest.raises(ValueError, match=message):
        load_grid(_smoke(block_shuffle=blocks))
