"""Batch-norm statistics at init: the step-0 probe and validation see what training's first step sees."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.conftest import REPO
from transfusion.config import JobSpec, TrainSettings
from transfusion.inits import initialize
from transfusion.models import create_model
from transfusion.probes import is_analysed_layer, load_probe, probe_layers
from transfusion.train import RecordingHooks, recalibrate_batch_norm, run_training

SETTINGS = TrainSettings(steps=8, batch_size=16, eval_every=4, resolution=32, probe_size=16, eval_batch_size=64)


def _shifted_source(model_name: str) -> dict[str, torch.Tensor]:
    """Source weights whose conv kernels have a negative mean (as a pretrained source's can):
    Mean-Var draws from that, and under running statistics (mean 0, var 1) every ReLU after
    the first conv block is off."""
    generator = torch.Generator().manual_seed(0)
    state = create_model(model_name, num_classes=1).state_dict()
    return {
        k: (torch.randn(v.shape, generator=generator) * 0.02 - 0.05) if v.ndim == 4 else v for k, v in state.items()
    }


def _mean_var_model(model_name: str = "cbr-small") -> torch.nn.Module:
    return initialize(create_model(model_name, num_classes=1), "mean-var", source=_shifted_source(model_name), seed=0)


def _active_fraction(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    seen: dict[str, float] = {}

    def record(name: str):
        def hook(_module, _inputs, out) -> None:
            seen[name] = float((out > 0).float().mean())

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.capture_modules().items()
        if is_analysed_layer(name)
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def test_recalibration_revives_layers_dead_under_running_statistics_and_touches_nothing_else():
    model = _mean_var_model()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = _active_fraction(model, x)
    assert min(before.values()) == 0.0, f"the constructed init should leave a layer dead: {before}"
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bn:
        m.momentum = 0.3  # a non-default momentum, to see it restored
    model.eval()

    layers = recalibrate_batch_norm(model, [x[:32], x[32:]])

    assert layers == len(bn)
    after = _active_fraction(model, x)
    assert set(after) == set(before) and all(v > 0.05 for v in after.values()), after
    # Weights, batch-norm affine parameters, momentum and mode as before.
    for key, value in model.state_dict().items():
        if key in weights:
            assert torch.equal(value, weights[key]), key
    assert all(m.momentum == 0.3 for m in bn) and not model.training
    # The statistics are those of the batches (cumulative average, fresh): the first layer's mean is the
    # mean of the two batch means of its conv output.
    first_bn, first_conv = bn[0], next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        means = [first_conv(b).mean(dim=(0, 2, 3)) for b in (x[:32], x[32:])]
    torch.testing.assert_close(first_bn.running_mean, (means[0] + means[1]) / 2, rtol=1e-4, atol=1e-5)
    assert int(first_bn.num_batches_tracked) == 2


def _draws_after_recalibration() -> None:
    """Every RNG stream draws after a recalibration what it would have drawn without one,
    though the forwards drew from each (a dropout layer, and hooks drawing from numpy and Python)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))

    def draw(*_) -> None:
        np.random.rand(), random.random()

    model[0].register_forward_hook(draw)
    x = torch.randn(8, 3, 8, 8)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    recalibrate_batch_norm(model, [x[:4], x[4:]])
    draws = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], expected[0]) and np.array_equal(draws[1], expected[1]), (draws, expected)
    assert draws[2] == expected[2], (draws, expected)


def test_recalibration_leaves_every_rng_stream_where_it_was():
    # In a fresh interpreter: this test process has threads left by other tests (servers'
    # clients, Ray) that may draw from Python's global stream at any moment.
    code = "from tests.test_init_bn import _draws_after_recalibration as check; check()"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_recalibration_refuses_no_batches_and_skips_models_without_batch_norm():
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batch_norm(_mean_var_model("cbr-tiny"), [])
    assert recalibrate_batch_norm(torch.nn.Sequential(torch.nn.Linear(3, 2)), []) == 0


def _run(dataset, init_bn: str, tmp_path) -> tuple[RecordingHooks, object]:
    torch.set_num_threads(1)
    spec = JobSpec(
        model="cbr-small", init="mean-var", dataset="synthetic-retina", data_size=160, seed=0,
        dataset_options={"train": 240, "val": 64, "test": 64},
        train=SETTINGS.model_copy(update={"init_bn": init_bn}),
    )  # fmt: skip
    hooks = RecordingHooks(artifact_dir=tmp_path / init_bn)
    result = run_training(spec, dataset, hooks=hooks, source_state=_shifted_source("cbr-small"))
    return hooks, result


def test_step0_probe_is_alive_after_recalibration_and_training_is_bit_identical(tiny_retina, tmp_path):
    running, running_result = _run(tiny_retina, "running", tmp_path)
    recalibrated, recalibrated_result = _run(tiny_retina, "recalibrate", tmp_path)

    at_init = {tag: load_probe(hooks.artifacts["probes/step-0.npz"]) for tag, hooks in
               (("running", running), ("recalibrate", recalibrated))}  # fmt: skip
    analysed = [layer for layer in probe_layers(at_init["running"]) if is_analysed_layer(layer)]
    dead = [layer for layer in analysed if not (at_init["running"][layer] > 0).any()]
    assert dead, "the constructed Mean-Var init should leave a layer dead under running statistics"
    for layer in analysed:
        assert (at_init["recalibrate"][layer] > 0).any(axis=0).mean() > 0.5, layer

    # Training saw nothing of it: the final probe, the trained weights (running statistics included),
    # the validation curve after step 0 and the test metrics are bit-identical.
    final_running = load_probe(running.artifacts["probes/step-8.npz"])
    final_recalibrated = load_probe(recalibrated.artifacts["probes/step-8.npz"])
    assert final_running.keys() == final_recalibrated.keys()
    for key in final_running:
        assert np.array_equal(final_running[key], final_recalibrated[key]), key
    weights_running = torch.load(running.artifacts["checkpoint/model.pt"])
    weights_recalibrated = torch.load(recalibrated.artifacts["checkpoint/model.pt"])
    assert all(torch.equal(weights_running[k], weights_recalibrated[k]) for k in weights_running)
    assert running.history("val/auc")[1:] == recalibrated.history("val/auc")[1:]
    assert running_result.final_metrics["test/auc"] == recalibrated_result.final_metrics["test/auc"]


def test_init_bn_is_validated_and_part_of_the_job_key():
    with pytest.raises(ValidationError, match="recalibrate"):
        TrainSettings(init_bn="batch")
    assert TrainSettings().init_bn == "recalibrate"
    from transfusion.tracking import job_params

    # Logged with every run (a param), so which statistics a stored step-0 probe used is on record.
    spec = JobSpec(model="cbr-tiny", init="random", dataset="synthetic-retina", train=TrainSettings(init_bn="running"))
    assert job_params(spec)["train.init_bn"] == "running"
    base = {"model": "cbr-tiny", "init": "random", "dataset": "synthetic-retina"}
    recalibrated = JobSpec(**base)
    running = JobSpec(**base, train=TrainSettings(init_bn="running"))
    # The step-0 probe differs, so a run of one is not reused as a run of the other; ``running`` (what
    # runs stored before the setting existed) keeps the key those runs carry.
    assert recalibrated.job_key != running.job_key
    unkeyed = {"init_bn", "threads", "cpus_per_job", "gpus_per_job", "num_workers", "max_failures", "eval_batch_size"}
    payload = running.model_dump(mode="json", exclude={"grid": True, "block_shuffle": True, "data_version": True,
                                 "weights_sha256": True, "code_version": True, "train": unkeyed})  # fmt: skip
    from transfusion.config import _short_hash

    assert running.job_key == _short_hash(payload)
