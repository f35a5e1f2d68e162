"""`transfusion pretrain` trains on the procedural source and registers the weights."""

import sqlite3

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_pretrain_registers_a_model_whose_weights_load(tmp_path):
    result = run_cli("pretrain", "--model", "cbr-tiny", "--steps", "4", "--resolution", "32", home=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registered models:/transfusion-cbr-tiny-synthetic/1" in result.stdout
    db = sqlite3.connect(tmp_path / "mlflow.db")
    assert db.execute("select name from registered_models").fetchall() == [("transfusion-cbr-tiny-synthetic",)]
    (source,) = db.execute("select source from model_versions").fetchone()
    assert source.startswith("runs:/") and source.endswith("/checkpoint")
    label = db.execute("select value from tags where key = 'transfer_label'").fetchone()[0]
    assert label == "synthetic-source transfer"
    # 4 steps is a weak source: the registered version, the run and the console say so.
    version_tags = dict(db.execute("select key, value from model_version_tags").fetchall())
    assert version_tags["source.quality"] == "weak" and version_tags["source.dataset"] == "synthetic-shapes"
    assert float(version_tags["source.epochs"]) < 1 and 0 <= float(version_tags["source.top1"]) <= 1
    assert version_tags["source.images_seen"] == str(4 * 32)
    run_tags = dict(db.execute("select key, value from tags where key like 'source.%'").fetchall())
    assert run_tags["source.quality"] == "weak" and "(weak)" in run_tags["source.description"]
    assert "models:/transfusion-cbr-tiny-synthetic/1 is a weak source" in result.stderr
    # The registered file is a plain state dict: loadable without pickled code, 16-way head.
    weights = next((tmp_path / "artifacts").rglob("checkpoint/model.pt"))
    state = torch.load(weights, weights_only=True)
    assert state["fc.weight"].shape == (16, 256)


def test_pretrain_unknown_model_is_one_line(tmp_path):
    result = run_cli("pretrain", "--model", "vgg-mega", home=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("transfusion: error: unknown model 'vgg-mega'; valid:")
