"""Property: any grid spec is either accepted with distinct job keys, or refused in one line."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from transfusion.config import load_grid

VALID_MODELS = ["cbr-tiny", "cbr-small", "cbr-large-tall", "resnet50", "inception-v3"]
SOURCE_FREE_INITS = ["random", "gabor"]

inits = st.one_of(
    st.sampled_from(["random", "gabor", "imagenet", "mean-var"]),
    st.builds(lambda k: {"name": "transfusion", "options": {"k": k}}, st.integers(min_value=0, max_value=3)),
)
valid_specs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["g", "grid-1", "A.b_c"]),
        "dataset": st.just("synthetic-retina"),
        "models": st.lists(st.sampled_from(VALID_MODELS), min_size=1, max_size=3, unique=True),
        "inits": st.lists(inits, min_size=1, max_size=3, unique_by=repr),
        "pretrained": st.just("synthetic"),
        "data_sizes": st.lists(
            st.one_of(st.just("full"), st.integers(min_value=1, max_value=400)), min_size=1, max_size=3, unique=True
        ),
        "seeds": st.one_of(
            st.integers(min_value=1, max_value=4),
            st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=4, unique=True),
        ),
        "train": st.fixed_dictionaries(
            {
                "steps": st.integers(min_value=1, max_value=1000),
                "lr": st.floats(min_value=1e-6, max_value=1.0),
                "resolution": st.integers(min_value=75, max_value=320),
                "momentum": st.floats(min_value=0, max_value=0.99),
            }
        ),
    }
)
# A field set to anything at all: often invalid (a boolean, a non-finite number, a
# repeat, a name not in a registry), sometimes valid by chance; either answer is fine.
garbage = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(min_value=-3, max_value=100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "full", "no-such-name", "cbr-tiny", "random"]),
    st.lists(st.one_of(st.booleans(), st.integers(min_value=-1, max_value=3), st.just("cbr-tiny")), max_size=3),
    st.just([{"name": "transfusion", "options": {"k": 99}}]),
    st.just({"k": 1}),
)
FIELDS = ["name", "dataset", "models", "inits", "pretrained", "data_sizes", "seeds", "max_retries"] + [
    f"train.{name}" for name in ("steps", "lr", "resolution", "momentum", "batch_size", "nope")
]


def _mutated(spec: dict, path: str, value: object) -> dict:
    spec = {**spec, "train": dict(spec["train"])}
    *outer, last = path.split(".")
    (spec["train"] if outer else spec)[last] = value
    return spec


grid_specs = st.one_of(
    valid_specs,
    st.builds(_mutated, valid_specs, st.sampled_from(FIELDS), garbage),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid_specs)
def test_accepted_grids_have_distinct_job_keys_and_rejected_ones_one_line(spec):
    try:
        grid = load_grid(spec)
    except ValueError as exc:
        message = str(exc)
        assert message.startswith("grid: ") and "\n" not in message, message
        event("rejected")
        return
    event("accepted")
    jobs = grid.jobs()
    assert len({job.job_key for job in jobs}) == len(jobs) > 0
    assert all(math.isfinite(value) for value in (grid.train.lr, grid.train.momentum))
    assert not any(isinstance(size, bool) for size in grid.data_sizes)
