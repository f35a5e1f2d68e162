"""Job identity against a real tracking server: placement changes and old stores retrain nothing."""

from __future__ import annotations

import pytest

from transfusion import tracking
from transfusion.config import GridSpec, JobSpec, TrainSettings, load_grid
from transfusion.identity import Mismatch, RecordedRun, RetrainFilter, match_finished_runs

pytestmark = pytest.mark.slow


def _grid(**train) -> GridSpec:
    return GridSpec(
        name="identity", dataset="synthetic-retina", models=["cbr-tiny"], inits=["random"], data_sizes=[1000],
        seeds=[2], train=TrainSettings(steps=40, resolution=32, cpus_per_job=2, **train),
    )  # fmt: skip


def _finished_run_tagged(grid: GridSpec, grid_run: tracking.GridRun, job_key: str) -> str:
    spec = grid.jobs()[0]
    run_id = tracking.create_job_run(spec, experiment_id=grid_run.experiment_id, parent_run_id=grid_run.run_id)
    tracking.set_tags(run_id, {"job_key": job_key})
    tracking.end_run(run_id, "FINISHED")
    return run_id


def test_store_written_with_version_1_keys_is_found_and_not_retrained(mlflow_server):
    from tasks.training import pending_jobs_task

    # Version 1 probed step 0 with the init's running batch-norm statistics (init_bn: running).
    grid = _grid(init_bn="running")
    grid_run = tracking.open_grid_run(grid)
    assert pending_jobs_task.fn(grid, grid_run) == 1
    # The key the code before placement-free keys wrote for this job (pinned in test_config).
    old_run = _finished_run_tagged(grid, grid_run, "67c85b535ca74d5c")
    assert pending_jobs_task.fn(grid, grid_run) == 0
    assert tracking.find_finished_run(grid_run.experiment_id, grid.jobs()[0].lookup_keys).info.run_id == old_run


def test_moving_a_finished_grid_to_other_resources_retrains_nothing(mlflow_server):
    from tasks.training import pending_jobs_task

    grid = _grid().model_copy(update={"name": "identity-moved"})
    grid_run = tracking.open_grid_run(grid)
    _finished_run_tagged(grid, grid_run, grid.jobs()[0].job_key)
    on_gpus = grid.model_copy(update={"train": grid.train.model_copy(update={"gpus_per_job": 1.0, "max_failures": 4})})
    assert on_gpus.jobs()[0].job_key == grid.jobs()[0].job_key
    assert pending_jobs_task.fn(on_gpus, grid_run) == 0
    longer = grid.model_copy(update={"train": grid.train.model_copy(update={"steps": 41})})
    assert pending_jobs_task.fn(longer, grid_run) == 1


# --- identity by content ---------------------------------------------------------------

SHA_A, SHA_B = "a" * 64, "b" * 64


def _transfer(**update) -> JobSpec:
    job = JobSpec(model="cbr-tiny", init="imagenet", pretrained="/weights/a.pt", dataset="synthetic-retina", seed=0)
    return job.model_copy(update=update)


def test_key_covers_the_data_and_weights_content_not_their_names():
    job = _transfer(data_version="v2-r32-x", weights_sha256=SHA_A)
    renamed = _transfer(pretrained="/elsewhere/b.pt", dataset_source="s3://b/other", data_version="v2-r32-x",
                        weights_sha256=SHA_A)  # fmt: skip
    assert renamed.job_key == job.job_key
    assert _transfer(data_version="v2-r32-y", weights_sha256=SHA_A).job_key != job.job_key
    assert _transfer(data_version="v2-r32-x", weights_sha256=SHA_B).job_key != job.job_key
    assert _transfer(data_version="v2-r32-x", weights_sha256=SHA_A, code_version="0.1.0").job_key != job.job_key
    # Unresolved, a job keeps the key by names, which stays among the keys looked up once resolved.
    assert _transfer().job_key == _transfer().name_key == job.name_key
    assert job.name_key in job.lookup_keys and job.lookup_keys[0] == job.job_key


def test_identity_code_is_validated_and_only_an_opt_in_changes_the_grid_key():
    smoke = load_grid("smoke").model_dump(mode="json")
    with pytest.raises(ValueError, match=r"identity\.code: Input should be 'ignore', 'package' or 'commit'"):
        load_grid({**smoke, "identity": {"code": "always"}})
    assert load_grid({**smoke, "identity": {"code": "ignore"}}).grid_key == load_grid("smoke").grid_key
    assert load_grid({**smoke, "identity": {"code": "package"}}).grid_key != load_grid("smoke").grid_key


def _run(run_id: str, job_key: str, *, start: int = 1, status: str = "FINISHED", **recorded) -> RecordedRun:
    return RecordedRun(run_id, job_key, status, start, **recorded)


def test_runs_under_earlier_keys_count_only_when_what_they_read_matches():
    job = _transfer(data_version="d1", weights_sha256=SHA_A)
    runs = [
        _run("same", job.name_key, start=1, data_version="d1", weights_sha256=SHA_A),
        _run("other-data", job.name_key, start=3, data_version="d0", weights_sha256=SHA_A),
        _run("other-weights", job.name_key, start=4, data_version="d1", weights_sha256=SHA_B),
        _run("unrelated", "0123456789abcdef", start=9, data_version="d1", weights_sha256=SHA_A),
    ]
    (match,) = match_finished_runs([job], runs)
    assert match.run.run_id == "same"
    assert {r.run_id: r.why for r in match.rejected} == {"other-data": Mismatch.DATA, "other-weights": Mismatch.WEIGHTS}
    assert "run other-data: different data (d0, now d1)" in match.reasons()
    # The re-pretrained source: nothing recorded under old keys counts any more.
    (repretrained,) = match_finished_runs([job.model_copy(update={"weights_sha256": SHA_B})], runs)
    assert repretrained.run.run_id == "other-weights"


def test_current_key_counts_newest_first_and_superseded_or_unfinished_runs_never_count():
    job = _transfer(data_version="d1", weights_sha256=SHA_A)
    runs = [
        _run("old", job.job_key, start=1, superseded_by="new"),
        _run("new", job.job_key, start=2),
        _run("newest-failed", job.job_key, start=3, status="FAILED"),
    ]
    (match,) = match_finished_runs([job], runs)
    assert [r.run_id for r in match.counted] == ["new"]
    assert {r.run_id: r.why for r in match.rejected} == {
        "old": Mismatch.SUPERSEDED,
        "newest-failed": Mismatch.UNFINISHED,
    }
    assert match.reasons() == ["run old: superseded by new"]


def test_opted_in_code_identity_refuses_runs_of_other_or_unrecorded_code():
    job = _transfer(data_version="d1", weights_sha256=SHA_A, code_version="0.2.0")
    read = {"data_version": "d1", "weights_sha256": SHA_A}
    runs = [
        _run("before", job.name_key, start=1, **read),
        _run("older", job.name_key, start=2, code_version="0.1.0+gabc1234", **read),
        _run("same", job.name_key, start=3, code_version="0.2.0+gdef5678.dirty", **read),
    ]
    (match,) = match_finished_runs([job], runs)
    assert match.run.run_id == "same"
    assert {r.run_id: r.why for r in match.rejected} == {"before": Mismatch.CODE, "older": Mismatch.CODE}


def test_retrain_filter_names_fields_and_matches_names_labels_and_aliases():
    grid = GridSpec(
        name="f", dataset="synthetic-retina", models=["cbr-tiny", "cbr-small"], inits=["random", "transfer"],
        pretrained="synthetic", seeds=[0, 1],
    )  # fmt: skip
    picked = lambda text: sorted(j.run_name for j in grid.jobs() if RetrainFilter.parse(text).matches(j))  # noqa: E731
    assert len(picked("")) == len(grid.jobs()) == 8
    assert picked("model=cbr-tiny,init=random") == ["cbr-tiny-random-full-s0", "cbr-tiny-random-full-s1"]
    assert picked("init=transfer,seed=1") == picked("init=synthetic-transfer,seed=1")
    assert len(picked("init=transfer,seed=1")) == 2
    assert len(picked("seed=0,seed=1,model=cbr-small")) == 4
    with pytest.raises(ValueError, match="unknown field 'lr'; valid: model, init, data_size, seed, source"):
        RetrainFilter.parse("lr=0.1")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        RetrainFilter.parse("model")


def test_finished_run_of_other_data_is_redone_and_of_the_same_data_is_not(mlflow_server):
    from tasks.training import identify_jobs, pending_jobs_task

    grid = _grid().model_copy(update={"name": "identity-content"})
    grid_run = tracking.open_grid_run(grid)
    (job,) = identify_jobs(grid, {})
    assert job.data_version == "v2-r32-seed0-3000-400-800" and job.job_key != job.name_key
    # A run the code before content identity wrote: keyed by names, the data version a param.
    old = _finished_run_tagged(grid, grid_run, job.name_key)
    tracking.log_params(old, {"data_version": "v2-r32-seed0-2000-400-800"})
    assert pending_jobs_task.fn(grid, grid_run, [job]) == 1
    (match,) = tracking.match_job_runs(grid_run.experiment_id, [job])
    assert match.reasons() == [f"run {old}: different data (v2-r32-seed0-2000-400-800, now {job.data_version})"]
    same = _finished_run_tagged(grid, grid_run, job.name_key)
    tracking.log_params(same, {"data_version": job.data_version})
    assert pending_jobs_task.fn(grid, grid_run, [job]) == 0
    assert pending_jobs_task.fn(grid, grid_run, [job], frozenset({job.job_key})) == 1  # --retrain


def test_job_runs_carry_identity_and_provenance_tags(mlflow_server, monkeypatch):
    from transfusion.provenance import code_version

    monkeypatch.setenv("TRANSFUSION_IMAGE", "registry.example/transfusion:test")
    grid = _grid().model_copy(update={"name": "identity-tags"})
    grid_run = tracking.open_grid_run(grid)
    job = grid.jobs()[0].model_copy(update={"data_version": "v2-x", "weights_sha256": SHA_A})
    run = tracking.client().get_run(tracking.create_job_run(job, experiment_id=grid_run.experiment_id,
                                                            parent_run_id=grid_run.run_id))  # fmt: skip
    tags = run.data.tags
    assert (tags["data_version"], tags["weights_sha256"], tags["job_key"]) == ("v2-x", SHA_A, job.job_key)
    assert tags["code_version"] == code_version() and tags["image"] == "registry.example/transfusion:test"
    parent = tracking.client().get_run(grid_run.run_id)
    assert parent.data.tags["code_version"] == code_version()
    assert "environment.txt" in tracking.list_artifacts(grid_run.run_id)
