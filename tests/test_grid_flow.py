"""The whole path from the README command: Prefect flow -> Ray Train -> MLflow -> analysis."""

from __future__ import annotations

import csv
import io

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_smoke_grid(tmp_path_factory):
    home = tmp_path_factory.mktemp("smoke-home")
    first = run_cli("run", "smoke", home=home)
    assert first.returncode == 0, first.stdout + first.stderr
    return home, first


def _store_client(home):
    from mlflow.tracking import MlflowClient

    from transfusion.services import start_mlflow_server

    server = start_mlflow_server(home)
    return server, MlflowClient(server.url)


def test_smoke_grid_leaves_one_finished_child_run_per_job(finished_smoke_grid):
    from transfusion.config import load_grid

    home, first = finished_smoke_grid
    assert "Grid smoke: 2 trained, 0 already done, 0 failed" in first.stdout
    assert "[2/2]" in first.stderr and "test/auc" in first.stderr
    assert (home / "mlflow.db").is_file()
    grid = load_grid("smoke")
    server, client = _store_client(home)
    try:
        experiment = client.get_experiment_by_name("smoke")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get("transfusion.role") == "grid"]
        children = [r for r in runs if r.data.tags.get("transfusion.role") == "job"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(r.data.tags["job_key"] for r in children) == sorted(j.job_key for j in grid.jobs())
        for run in children:
            tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
            assert run.info.status == "FINISHED"
            assert tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert {tags["model"], tags["init"], tags["data_size"], tags["grid"]} == {
                "cbr-tiny",
                "random",
                "160",
                "smoke",
            }
            assert tags["seed"] in ("0", "1")
            assert params["model"] == "cbr-tiny" and params["train.steps"] == "6"
            for key in ("train/loss", "val/auc", "test/auc", "test/auprc", "time/train_s", "time/total_s"):
                assert key in metrics, key
            assert metrics["time/total_s"] >= metrics["time/train_s"] > 0
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/auc")]
            assert steps == [0, 3, 6]
            artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
            assert {"spec.json", "probes", "checkpoint"} <= artifacts
            probes = {f.path for f in client.list_artifacts(run.info.run_id, "probes")}
            assert probes == {"probes/step-0.npz", "probes/step-6.npz"}
            assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]
        tables = {f.path for f in client.list_artifacts(parents[0].info.run_id, "tables")}
        assert {"tables/results.csv", "tables/results.md", "tables/results.png", "tables/seed_similarity.md"} <= tables
        text = client.download_artifacts(parents[0].info.run_id, "tables/results.csv")
        rows = list(csv.DictReader(io.StringIO(open(text).read())))
        assert len(rows) == 1 and rows[0]["model"] == "cbr-tiny" and rows[0]["seeds"] == "2"
        png = client.download_artifacts(parents[0].info.run_id, "tables/results.png")
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        server.stop()


def test_rerun_trains_nothing_and_shows_the_same_table(finished_smoke_grid):
    home, first = finished_smoke_grid
    again = run_cli("run", "smoke", home=home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Grid smoke: 0 trained, 2 already done, 0 failed" in again.stdout
    table = lambda out: [line for line in out.splitlines() if line.startswith("| cbr-tiny")]  # noqa: E731
    assert table(again.stdout) == table(first.stdout) and table(first.stdout)
    server, client = _store_client(home)
    try:
        experiment = client.get_experiment_by_name("smoke")
        runs = client.search_runs([experiment.experiment_id])
        assert sum(r.data.tags.get("transfusion.role") == "job" for r in runs) == 2
        assert sum(r.data.tags.get("transfusion.role") == "grid" for r in runs) == 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "smoke", "--set", "models=[resnet-9000]"], "unknown model 'resnet-9000'; valid:"),
        (["run", "smoke", "--set", "inits=[magic]"], "unknown init 'magic'; valid:"),
        (["run", "smoke", "--set", "dataset=nope"], "unknown dataset 'nope'; valid:"),
        (["run", "smoke", "--set", "data_sizes=[100000]"], "data_size 100000 is larger than the 240 training images"),
        (["run", "smoke", "--set", "train.steps=0"], "train.steps: Input should be greater than 0"),
        (["run", "missing-grid.yaml"], "grid file missing-grid.yaml does not exist"),
        (["run", "smoke", "--set", "seeds=-3"], "seed count must be >= 1"),
    ],
)
def test_bad_input_gets_one_line_and_starts_nothing(tmp_path, monkeypatch, capsys, args, message):
    from flows.cli import main

    monkeypatch.setenv("TRANSFUSION_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("transfusion: error:") and message in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_malformed_grid_file_is_one_line(tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("name: x\nmodels: [cbr-tiny\n")
    result = run_cli("run", str(bad), home=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("transfusion: error: grid file") and "not valid YAML" in result.stderr
