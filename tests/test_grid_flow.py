"""The whole path from the README command: Prefect flow -> Ray Train -> MLflow -> analysis."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from tests.conftest import identity_of, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_smoke_grid(tmp_path_factory):
    home = tmp_path_factory.mktemp("smoke-home")
    # Sampled every second, so that even these seconds-long jobs log system metrics.
    first = run_cli("run", "smoke", home=home, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    assert first.returncode == 0, first.stdout + first.stderr
    return home, first


def _store_client(home):
    from mlflow.tracking import MlflowClient

    from flows.runtime import start_mlflow_server

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
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        assert "2 training jobs on synthetic-retina" in experiment.tags["mlflow.note.content"]
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get("transfusion.role") == "grid"]
        children = [r for r in runs if r.data.tags.get("transfusion.role") == "job"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(r.data.tags["job_key"] for r in children) == sorted(
            j.model_copy(update=identity_of(children, j)).job_key for j in grid.jobs()
        )
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
            # Device-seconds held: wall time x the one device (a GPU, else a CPU) a smoke job asks for.
            assert metrics["time/device_s"] == pytest.approx(metrics["time/total_s"])
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/auc")]
            assert steps == [0, 3, 6]
            artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
            assert {"spec.json", "probes", "checkpoint", "predictions"} <= artifacts
            assert [f.path for f in client.list_artifacts(run.info.run_id, "predictions")] == ["predictions/test.npz"]
            probes = {f.path for f in client.list_artifacts(run.info.run_id, "probes")}
            assert probes == {"probes/step-0.npz", "probes/step-6.npz"}
            assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]
            assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)
            assert any(key.startswith("system/system_memory_usage") for key in metrics), sorted(metrics)
            _assert_dataset_inputs_and_logged_model(home, server.url, client, run)
        spent = sum(run.data.metrics["time/device_s"] for run in children)
        assert parents[0].data.metrics["time/device_s"] == pytest.approx(spent)
        table = client.download_artifacts(parents[0].info.run_id, "tables/results.json")
        table = json.loads(open(table).read())
        assert table["columns"][:3] == ["model", "init", "data_size"]
        assert table["data"][0][:3] == ["cbr-tiny", "random", "160"]
        tables = {f.path for f in client.list_artifacts(parents[0].info.run_id, "tables")}
        assert {"tables/results.csv", "tables/results.md", "tables/results.png", "tables/seed_similarity.md"} <= tables
        text = client.download_artifacts(parents[0].info.run_id, "tables/results.csv")
        rows = list(csv.DictReader(io.StringIO(open(text).read())))
        assert len(rows) == 1 and rows[0]["model"] == "cbr-tiny" and rows[0]["seeds"] == "2"
        png = client.download_artifacts(parents[0].info.run_id, "tables/results.png")
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        server.stop()


def test_report_threshold_option_reaches_the_report(finished_smoke_grid, tmp_path):
    home, _ = finished_smoke_grid
    result = run_cli("report", "smoke", "--out", str(tmp_path), "--threshold", "0.93", home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "report.md").read_text()
    assert "Convergence threshold: validation AUC 0.930 (absolute)." in text
    assert "Figure 5: convergence (threshold 0.930, absolute)" in text


def _assert_dataset_inputs_and_logged_model(home, tracking_uri, client, run):
    """The job's splits are run inputs and its final weights an MLflow model that scores the logged test AUC."""
    import mlflow.pytorch
    import torch

    from transfusion.data import PreparedDataset
    from transfusion.train import evaluate

    version = run.data.params["data_version"]
    counts = PreparedDataset.open(home / "data" / "synthetic-retina" / version).meta["counts"]
    # The train input is the job's subset; val and test are whole splits.
    expected_images = {
        "train": min(int(run.data.tags["data_size"]), counts["train"]),
        "val": counts["val"],
        "test": counts["test"],
    }
    assert expected_images["train"] < counts["train"]
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["synthetic-retina/test", "synthetic-retina/train", "synthetic-retina/val"]
    for name, item in inputs.items():
        split = name.rsplit("/", 1)[1]
        assert item.dataset.digest == version
        assert [(t.key, t.value) for t in item.tags] == [("mlflow.data.context", split)]
        profile = json.loads(item.dataset.profile)
        assert profile["labels"] == 1 and profile["images"] == expected_images[split]
        assert version in item.dataset.source
    models = run.outputs.model_outputs
    assert len(models) == 1 and models[0].step == 6
    logged = client.get_logged_model(models[0].model_id)
    assert logged.source_run_id == run.info.run_id and logged.status.to_proto() == 2  # READY
    linked = {m.key: m for m in logged.metrics}
    assert linked["test/auc"].value == run.data.metrics["test/auc"]
    assert linked["test/auc"].dataset_name == "synthetic-retina/test" and linked["test/auc"].dataset_digest == version
    from transfusion.tracking import fluent_tracking_uri

    with fluent_tracking_uri(tracking_uri):  # this grid's server is stopped after the test
        model = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    assert os.environ.get("MLFLOW_TRACKING_URI") != tracking_uri
    dataset = PreparedDataset.open(home / "data" / "synthetic-retina" / version)
    scores = evaluate(model, dataset, dataset.indices("test"), prefix="test", batch_size=64, device=torch.device("cpu"))
    assert scores["test/auc"] == pytest.approx(run.data.metrics["test/auc"], abs=1e-6)


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
        # `transfusion ui` opens on the grid run last: this one.
        from transfusion.tracking import last_grid_experiment

        assert last_grid_experiment(uri=server.url) == experiment.experiment_id
    finally:
        server.stop()
    # From another shell: the plan counts the finished jobs and sets what they spent beside its estimate.
    plan = run_cli("plan", "smoke", "--gpu", "cpu", home=home)
    assert plan.returncode == 0, plan.stderr
    assert "Jobs: 2 in total, 2 already finished, 0 pending" in plan.stdout
    assert "device-hours logged by 2 finished jobs" in plan.stdout
    status = run_cli("status", "smoke", home=home)
    assert status.returncode == 0, status.stderr
    assert "2 jobs: 2 finished, 0 running, 0 failed, 0 pending" in status.stdout


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


def _chromium():
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    options = Options()
    options.binary_location = browser
    # Headless, and quiet: this machine's closed network refuses Chromium's background calls.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1600,1000"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait_for(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.5).until(condition)


def test_mlflow_ui_in_a_real_browser_shows_the_runs_and_compares_two(finished_smoke_grid, tmp_path):
    import json
    import urllib.parse

    from selenium.webdriver.common.by import By

    home, _ = finished_smoke_grid
    server, client = _store_client(home)
    browser = _chromium()
    try:
        from transfusion.tracking import experiment_page_url

        experiment = client.get_experiment_by_name("smoke")
        runs = client.search_runs([experiment.experiment_id])
        children = [r for r in runs if r.data.tags.get("transfusion.role") == "job"]
        # The page `transfusion ui` opens: the experiment itself, which lands on its runs table.
        browser.get(experiment_page_url(server.url, experiment.experiment_id))
        headers = "//*[@role='columnheader']"
        _wait_for(browser, lambda b: "/runs" in b.current_url and b.find_elements(By.XPATH, headers))
        header_text = _wait_for(browser, lambda b: " ".join(h.text for h in b.find_elements(By.XPATH, headers)))
        assert "Dataset" in header_text and "Models" in header_text, header_text
        parent_row = "//*[text()='grid-smoke']/ancestor::*[@role='row'][1]//button"
        _wait_for(browser, lambda b: b.find_elements(By.XPATH, parent_row))[0].click()  # expand the grid's child runs

        def child_links(b):
            links = {a.get_attribute("href") or "": a.text for a in b.find_elements(By.TAG_NAME, "a")}
            found = {r.info.run_id: t for h, t in links.items() for r in children if r.info.run_id in h}
            return found if len(found) == len(children) else None

        shown = _wait_for(browser, child_links)
        # Run names carry model, init, data size and seed: cbr-tiny-random-160-s0.
        for run in children:
            assert run.data.tags["mlflow.runName"].startswith(shown[run.info.run_id].rstrip(".…"))

        # The table's scrolling part: each job's row fills Dataset (its train split with the
        # data version, "+2" for val and test) and Models (its logged model).
        version = children[0].data.params["data_version"]

        def filled_rows(b):
            texts = [e.text for e in b.find_elements(By.XPATH, "//*[@role='row']")]
            found = [t for t in texts if t.startswith("synthetic-retina/")]
            return found if len(found) == len(children) else None

        for text in _wait_for(browser, filled_rows):
            assert text.startswith(f"synthetic-retina/train ({version})") and "+2" in text, text
            assert text.splitlines()[-1] == "model", text
        browser.save_screenshot(str(tmp_path / "runs.png"))

        ids = json.dumps([r.info.run_id for r in children[:2]])
        experiments = json.dumps([experiment.experiment_id])
        browser.get(
            f"{server.url}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(experiments)}"
        )
        body = _wait_for(browser, lambda b: "Parameters" in b.find_element(By.TAG_NAME, "body").text and b)
        text = _wait_for(browser, lambda b: (t := b.find_element(By.TAG_NAME, "body").text) and "seed" in t and t)
        for run in children[:2]:
            assert run.info.run_id in text and run.data.tags["mlflow.runName"] in text
        for param in ("model cbr-tiny cbr-tiny", "init random random", "data_size 160 160"):
            assert param in text, param
        assert "seed 0 1" in text or "seed 1 0" in text
        body.save_screenshot(str(tmp_path / "compare.png"))
    finally:
        browser.quit()
        server.stop()
