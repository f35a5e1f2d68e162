"""``models:/`` weights: downloaded once per registered artifact into the cache, no temporary folders left."""

import tempfile
from pathlib import Path

import pytest
import torch

from transfusion import tracking
from transfusion.pretrained import load_state_dict_from_uri

pytestmark = pytest.mark.slow


def _leftover_temp_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("transfusion-weights-*")}


def test_registered_weights_are_cached_per_version_and_leave_no_temp_folder(mlflow_server, session_home, tmp_path):
    experiment_id = tracking.ensure_experiment("registered-weights")
    run_id = tracking.client().create_run(experiment_id).info.run_id
    weights = tmp_path / "model.pt"
    torch.save({"w": torch.arange(3.0)}, weights)
    tracking.log_artifact(run_id, weights, "checkpoint")
    uri = tracking.register_model_weights("cache-test", run_id, "checkpoint/model.pt")
    before = _leftover_temp_folders()

    first = load_state_dict_from_uri(uri)
    again = load_state_dict_from_uri("models:/cache-test/latest")
    assert torch.equal(first.state_dict["w"], torch.arange(3.0))
    assert again.path == first.path and first.path.is_relative_to(session_home / "cache" / "weights" / "models")
    assert _leftover_temp_folders() == before
    assert not list(first.path.parents[1].glob(".partial-*"))
