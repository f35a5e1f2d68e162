"""What a job logs for "how far from the source": per-stage distances from init and a probe of its source network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import transfusion.train as train
from transfusion.config import JobSpec, TrainSettings
from transfusion.models import create_model
from transfusion.probes import load_probe, probe_layers
from transfusion.train import DISTANCE_PREFIX, RecordingHooks, distances_from_init, run_training

SETTINGS = TrainSettings(steps=8, batch_size=16, eval_every=4, resolution=32, probe_size=16, eval_batch_size=64)


def _spec(**overrides) -> JobSpec:
    base = dict(model="cbr-tiny", init="random", dataset="synthetic-retina", data_size=160, seed=0, train=SETTINGS,
                dataset_options={"train": 240, "val": 64, "test": 64})  # fmt: skip
    return JobSpec(**{**base, **overrides})


def _source() -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    return create_model("cbr-tiny", num_classes=1).state_dict()


def _initial(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_distance_is_zero_for_untouched_weights_and_exact_for_a_known_move():
    model = create_model("cbr-tiny", num_classes=1)
    initial = _initial(model)
    assert distances_from_init(model, initial) == {"conv1": 0.0, "stage1": 0.0, "stage2": 0.0, "stage3": 0.0}

    # stage2's every parameter scaled by 1.25: ||0.25 W|| / ||W|| = 0.25; conv1 shifted by a known vector.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("stage2."):
                p.mul_(1.25)
        conv1 = dict(model.named_parameters())["conv1.0.weight"]
        step = torch.full_like(conv1, 0.01)
        conv1.add_(step)
    conv1_norm = math.sqrt(sum(float((v.double() ** 2).sum()) for n, v in initial.items() if n.startswith("conv1.")))
    distances = distances_from_init(model, initial)
    assert distances["stage2"] == pytest.approx(0.25, rel=1e-6)  # float32 rounding of 1.25 W
    assert distances["conv1"] == pytest.approx(float(step.double().norm()) / conv1_norm, rel=1e-6)
    assert distances["stage1"] == 0.0 and distances["stage3"] == 0.0


def test_transfer_job_probes_its_source_logs_distances_and_trains_as_without(tiny_retina, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    running = SETTINGS.model_copy(update={"init_bn": "running"})
    spec = _spec(init="imagenet", pretrained="/unused/source.pt", train=running)
    hooks = RecordingHooks(artifact_dir=tmp_path / "with")
    result = run_training(spec, tiny_retina, hooks=hooks, source_state=_source())

    # Under init_bn: running the step-0 probe is the source network too (transferred weights, the
    # source's statistics, eval mode): the source probe must equal it, array for array.
    source, step0 = load_probe(hooks.artifacts["probes/source.npz"]), load_probe(hooks.artifacts["probes/step-0.npz"])
    assert probe_layers(source) == probe_layers(step0)
    for key in step0:
        assert np.array_equal(source[key], step0[key]), key

    # The logged distances are those of the stored final weights from the init the job built.
    initial = train.build_model(spec, tiny_retina, source_state=_source())
    final = train.create_job_model(spec, tiny_retina)
    final.load_state_dict(torch.load(hooks.artifacts["checkpoint/model.pt"]))
    expected = distances_from_init(final, _initial(initial))
    logged = {k.removeprefix(DISTANCE_PREFIX): v for s, k, v in hooks.metrics if k.startswith(DISTANCE_PREFIX)}
    assert logged.keys() == expected.keys() == {"conv1", "stage1", "stage2", "stage3"}
    for stage, value in expected.items():
        assert logged[stage] == pytest.approx(value, rel=1e-12) and value > 0, stage

    # Without the source probe, training is bit-identical: weights, validation curve and test AUC.
    monkeypatch.setattr(train, "probe_source", lambda state: None)
    bare = RecordingHooks(artifact_dir=tmp_path / "without")
    bare_result = run_training(spec, tiny_retina, hooks=bare, source_state=_source())
    assert "probes/source.npz" not in bare.artifacts
    with_weights = torch.load(hooks.artifacts["checkpoint/model.pt"])
    without_weights = torch.load(bare.artifacts["checkpoint/model.pt"])
    assert all(torch.equal(with_weights[k], without_weights[k]) for k in with_weights)
    assert hooks.history("val/auc") == bare.history("val/auc")
    assert result.final_metrics["test/auc"] == bare_result.final_metrics["test/auc"]


def test_random_init_has_no_source_probe_and_a_resumed_job_measures_from_the_same_init(tiny_retina, tmp_path):
    torch.set_num_threads(1)
    spec = _spec()
    whole = RecordingHooks(artifact_dir=tmp_path / "whole")
    run_training(spec, tiny_retina, hooks=whole)
    assert "probes/source.npz" not in whole.artifacts
    resumed = RecordingHooks(artifact_dir=tmp_path / "resumed")
    # The checkpoint at step 4 carries the initial weights, so the resumed job measures from them.
    run_training(spec, tiny_retina, hooks=resumed, resume=whole.checkpoints[0][1])
    distances = {k: v for _, k, v in whole.metrics if k.startswith(DISTANCE_PREFIX)}
    assert len(distances) == 4
    assert {k: v for _, k, v in resumed.metrics if k.startswith(DISTANCE_PREFIX)} == distances
