"""Re-runs end to end: ``--retrain`` replaces runs and keeps the old ones; a re-run with nothing
to train reads no image, even with its prepared data and caches deleted."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _job_runs(home) -> list:
    from mlflow.tracking import MlflowClient

    from flows.runtime import start_mlflow_server

    server = start_mlflow_server(home)
    try:
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("smoke")
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`transfusion.role` = 'job'")
        artifacts = {r.info.run_id: {f.path for f in client.list_artifacts(r.info.run_id)} for r in runs}
        return [(r, artifacts[r.info.run_id]) for r in runs]
    finally:
        server.stop()


def test_retrain_replaces_matching_runs_and_a_rerun_without_data_reads_no_image(tmp_path):
    home = tmp_path / "home"
    first = run_cli("run", "smoke", home=home)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Grid smoke: 2 trained, 0 already done, 0 failed" in first.stdout

    retrain = run_cli("run", "smoke", "--retrain", "seed=0", home=home)
    assert retrain.returncode == 0, retrain.stdout + retrain.stderr
    assert "Grid smoke: 1 trained, 1 already done, 0 failed" in retrain.stdout
    runs = _job_runs(home)
    assert len(runs) == 3
    old = [r for r, _ in runs if "superseded_by" in r.data.tags]
    assert len(old) == 1 and old[0].data.tags["seed"] == "0" and old[0].info.status == "FINISHED"
    new = [r for r, _ in runs if r.info.run_id == old[0].data.tags["superseded_by"]]
    assert (
        len(new) == 1 and new[0].data.tags["seed"] == "0" and new[0].data.tags["job_key"] == old[0].data.tags["job_key"]
    )
    for run, artifacts in runs:
        tags = run.data.tags
        assert tags["data_version"] == run.data.params["data_version"] == "v2-r64-seed0-240-160-64"
        assert tags["code_version"] and "environment.txt" in artifacts

    # The prepared data, every cache and the local report gone: the re-run identifies jobs without them,
    # and the report's interpolation between the two seeds comes from the curves its parent run stored.
    data = home / "data"
    shutil.rmtree(data)
    shutil.rmtree(home / "cache", ignore_errors=True)
    shutil.rmtree(home / "reports", ignore_errors=True)
    again = run_cli("run", "smoke", home=home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Grid smoke: 0 trained, 2 already done, 0 failed" in again.stdout
    assert not data.exists(), sorted(p.name for p in data.rglob("*"))
    assert len(_job_runs(home)) == 3
    report = (home / "reports" / "smoke" / "report.md").read_text()
    assert "## Same basin?" in report and "| cbr-tiny | 160 | random–random | 1 |" in report
