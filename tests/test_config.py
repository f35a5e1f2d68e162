import json

import pytest

from transfusion.config import GridSpec, JobSpec, TrainSettings, load_grid
from transfusion.presets import PRESETS


def _job(**overrides) -> JobSpec:
    base = {"model": "cbr-tiny", "init": "random", "dataset": "synthetic-retina", "data_size": 100, "seed": 0}
    return JobSpec(**{**base, **overrides})


def test_job_key_is_deterministic_and_sensitive_to_every_field():
    assert _job().job_key == _job().job_key
    assert len(_job().job_key) == 16
    keys = {
        _job().job_key,
        _job(seed=1).job_key,
        _job(model="cbr-small").job_key,
        _job(data_size="full").job_key,
        _job(train=TrainSettings(steps=7)).job_key,
        _job(init="gabor").job_key,
    }
    assert len(keys) == 6
    # The grid name is a label, not part of what the job computes.
    assert _job(grid="a").job_key == _job(grid="b").job_key


def test_job_key_ignores_placement_and_fault_policy_but_not_the_experiment():
    base = _job().job_key
    placed = TrainSettings(
        threads=3, cpus_per_job=4, gpus_per_job=0.25, num_workers=2, max_failures=5, eval_batch_size=7
    )
    assert _job(train=placed).job_key == base
    assert _job(train=TrainSettings(steps=7)).job_key != base
    assert _job(train=TrainSettings(lr=0.5)).job_key != base
    assert _job(dataset_options={"train": 10}).job_key != base


def test_legacy_key_is_the_one_version_1_wrote():
    # Pinned from the code that wrote stores before placement left the key (commit 38ebbba):
    # those stores tag their runs with these keys.
    # Those runs probed step 0 with the init's running batch-norm statistics: they are runs of
    # ``init_bn: running``, and not of the default (recalibrated statistics).
    spec = JobSpec(
        grid="g", model="cbr-tiny", init="random", dataset="synthetic-retina", data_size=1000, seed=2,
        train=TrainSettings(steps=40, resolution=32, cpus_per_job=2, init_bn="running"),
    )  # fmt: skip
    assert spec.legacy_job_keys == ("67c85b535ca74d5c",)
    assert spec.lookup_keys == (spec.job_key, "67c85b535ca74d5c")
    running = TrainSettings(init_bn="running")
    transfer = JobSpec(
        grid="g", model="cbr-small", init="imagenet", pretrained="synthetic", dataset="synthetic-retina", train=running
    )
    assert transfer.model_copy(update={"seed": 1}).legacy_job_keys == ("9736b92490a522a3",)
    recalibrated = spec.model_copy(update={"train": spec.train.model_copy(update={"init_bn": "recalibrate"})})
    assert recalibrated.legacy_job_keys == () and recalibrated.lookup_keys == (recalibrated.job_key,)


def test_grid_is_the_cartesian_product_in_stable_order():
    grid = GridSpec(
        name="g", dataset="synthetic-retina", models=["cbr-tiny", "cbr-small"],
        inits=["random", "gabor"], data_sizes=[50, "full"], seeds=[0, 1, 2],
    )  # fmt: skip
    jobs = grid.jobs()
    assert len(jobs) == 2 * 2 * 2 * 3
    assert len({j.job_key for j in jobs}) == len(jobs)
    assert (jobs[0].model, jobs[0].init, jobs[0].data_size, jobs[0].seed) == ("cbr-tiny", "random", 50, 0)
    assert [j.job_key for j in grid.jobs()] == [j.job_key for j in jobs]


def test_seed_count_expands_and_negative_count_is_refused():
    grid = GridSpec(name="g", dataset="synthetic-retina", models=["cbr-tiny"], inits=["random"], seeds=3)
    assert grid.seeds == [0, 1, 2]
    with pytest.raises(ValueError, match="seed count must be >= 1"):
        GridSpec(name="g", dataset="synthetic-retina", models=["cbr-tiny"], inits=["random"], seeds=-1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("models", ["resnet-9000"], "unknown model 'resnet-9000'; valid: .*cbr-tiny"),
        ("inits", ["magic"], "unknown init 'magic'; valid: .*random"),
        ("dataset", "mnist-of-doom", "unknown dataset 'mnist-of-doom'; valid: .*synthetic-retina"),
        ("data_sizes", [0], "data_size must be 'full' or a positive integer"),
    ],
)
def test_bad_names_and_values_are_refused_listing_valid_choices(field, value, message):
    data = {"name": "g", "dataset": "synthetic-retina", "models": ["cbr-tiny"], "inits": ["random"], field: value}
    with pytest.raises(ValueError, match=message):
        load_grid(data)


def test_non_positive_steps_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"train\.steps: .*greater than 0"):
        load_grid({"name": "g", "dataset": "synthetic-retina", "models": ["cbr-tiny"], "inits": ["random"],
                   "train": {"steps": 0}})  # fmt: skip


def test_transfer_inits_need_a_pretrained_source():
    with pytest.raises(ValueError, match="pretrained"):
        load_grid({"name": "g", "dataset": "synthetic-retina", "models": ["cbr-tiny"], "inits": ["imagenet"]})


def test_grid_files_yaml_and_json(tmp_path):
    data = {"name": "mine", "dataset": "synthetic-retina", "models": ["cbr-tiny"], "inits": ["random"], "seeds": 2}
    (tmp_path / "g.json").write_text(json.dumps(data))
    (tmp_path / "g.yaml").write_text(
        "name: mine\ndataset: synthetic-retina\nmodels: [cbr-tiny]\ninits: [random]\nseeds: 2\n"
    )
    assert load_grid(tmp_path / "g.json") == load_grid(str(tmp_path / "g.yaml"))
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml line \d+: not valid YAML"):
        load_grid(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_grid(str(tmp_path / "list.yaml"))
    with pytest.raises(ValueError, match="does not exist"):
        load_grid(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="neither a grid preset"):
        load_grid("no-such-preset")


def test_unknown_grid_field_is_refused():
    with pytest.raises(ValueError, match="stepz"):
        load_grid({"name": "g", "dataset": "synthetic-retina", "models": ["cbr-tiny"], "inits": ["random"], "stepz": 3})


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_preset_validates(name):
    grid = load_grid(name)
    assert grid.jobs()
