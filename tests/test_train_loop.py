"""The plain PyTorch loop, without Ray or MLflow."""

import numpy as np
import pytest
import torch

from transfusion.config import JobSpec, TrainSettings
from transfusion.faults import FaultInjection
from transfusion.metrics import RunPredictions, roc_auc
from transfusion.probes import load_probe, probe_layers
from transfusion.train import (
    NonFiniteLossError,
    RecordingHooks,
    batch_indices,
    run_training,
    training_pool,
)

SETTINGS = TrainSettings(steps=8, batch_size=16, eval_every=4, resolution=32, probe_size=16, eval_batch_size=64)


def _spec(**overrides) -> JobSpec:
    base = dict(model="cbr-tiny", init="random", dataset="synthetic-retina", data_size=160, seed=0, train=SETTINGS,
                dataset_options={"train": 240, "val": 64, "test": 64})  # fmt: skip
    return JobSpec(**{**base, **overrides})


def test_loop_logs_metrics_probes_and_checkpoints(tiny_retina, tmp_path):
    torch.set_num_threads(1)
    hooks = RecordingHooks(artifact_dir=tmp_path)
    result = run_training(_spec(), tiny_retina, hooks=hooks)
    assert result.steps == 8
    val = hooks.history("val/auc")
    assert [s for s, _ in val] == [0, 4, 8]
    assert all(0.0 <= v <= 1.0 for _, v in val)
    # eval_every 4 logs the running loss every max(1, 4 // 5) = 1 step.
    loss = hooks.history("train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(np.isfinite(v) and v > 0 for _, v in loss)
    for key in ("test/auc", "test/auprc", "time/train_s"):
        assert key in result.final_metrics
    assert [step for step, _ in hooks.checkpoints] == [4, 8]
    assert {"probes/step-0.npz", "probes/step-8.npz", "checkpoint/model.pt", "predictions/test.npz"} <= set(
        hooks.artifacts
    )
    stored = RunPredictions.load(hooks.artifacts["predictions/test.npz"])
    assert np.array_equal(stored.index, tiny_retina.indices("test")) and stored.scores.shape == (64, 1)
    assert roc_auc(stored.targets[:, 0], stored.scores[:, 0]) == pytest.approx(result.final_metrics["test/auc"])
    assert result.final_metrics["test/selected_step"] == 8
    start = load_probe(hooks.artifacts["probes/step-0.npz"])
    end = load_probe(hooks.artifacts["probes/step-8.npz"])
    assert probe_layers(start) == ["conv1", "stage1", "stage2", "stage3", "pool", "logits"]
    assert start["conv1"].dtype == np.float16
    # Conv maps keep 10 x channels unpooled (image, position) rows: 20 of the 16 x 16 positions of each of 16 images.
    assert start["conv1"].shape == (320, 32)
    assert np.array_equal(start["conv1.rows"], end["conv1.rows"])
    assert start["pool"].shape == (16, 256) and start["logits"].shape == (16, 1)
    assert not np.allclose(start["stage3"], end["stage3"])


def test_same_seed_same_result_and_resume_matches_uninterrupted(tiny_retina):
    torch.set_num_threads(1)
    full = RecordingHooks()
    reference = run_training(_spec(), tiny_retina, hooks=full)
    again = run_training(_spec(), tiny_retina, hooks=RecordingHooks())
    assert again.final_metrics["test/auc"] == pytest.approx(reference.final_metrics["test/auc"], abs=1e-6)

    step4_state = dict(full.checkpoints)[4]
    resumed = run_training(_spec(), tiny_retina, hooks=RecordingHooks(), resume=step4_state)
    assert resumed.steps == 8
    assert resumed.final_metrics["test/auc"] == pytest.approx(reference.final_metrics["test/auc"], abs=1e-4)


def test_batches_are_a_function_of_seed_and_step():
    pool = np.arange(100, 200)
    a = batch_indices(pool, seed=1, step=5, batch_size=8)
    np.testing.assert_array_equal(a, batch_indices(pool, seed=1, step=5, batch_size=8))
    assert not np.array_equal(a, batch_indices(pool, seed=1, step=6, batch_size=8))
    assert set(a) <= set(pool)


def test_nan_loss_stops_the_job(tiny_retina):
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        run_training(_spec(), tiny_retina, hooks=FaultInjection(RecordingHooks(), nan_at_step=2))


def test_loop_trains_any_prepared_dataset_multilabel_grey(session_home):
    from transfusion.data import prepare_dataset

    chest = prepare_dataset("synthetic-chest", resolution=32, options={"train": 96, "val": 48, "test": 48},
                            home=session_home)  # fmt: skip
    spec = _spec(dataset="synthetic-chest", dataset_options={"train": 96, "val": 48, "test": 48}, data_size=64)
    result = run_training(spec, chest, hooks=RecordingHooks())
    assert chest.in_channels == 1 and chest.num_labels == 5
    per_label = [k for k in result.final_metrics if k.startswith("test/auc/")]
    assert len(per_label) >= 3 and "test/auc" in result.final_metrics


def test_best_val_selection_tests_the_best_validation_step_and_resumes_with_it(tiny_retina):
    torch.set_num_threads(1)
    spec = _spec(train=SETTINGS.model_copy(update={"select": "best-val", "eval_every": 2}))
    hooks = RecordingHooks()
    result = run_training(spec, tiny_retina, hooks=hooks)
    val = hooks.history("val/auc")
    best_step = max(val, key=lambda item: (item[1], -item[0]))[0]  # the first step of the best AUC
    assert result.final_metrics["test/selected_step"] == best_step
    resumed = run_training(spec, tiny_retina, hooks=RecordingHooks(), resume=dict(hooks.checkpoints)[6])
    assert resumed.final_metrics["test/selected_step"] == best_step
    assert resumed.final_metrics["test/auc"] == pytest.approx(result.final_metrics["test/auc"], abs=1e-4)


def test_subset_seed_holds_the_training_images_fixed_across_seeds(tiny_retina):
    fixed = SETTINGS.model_copy(update={"subset_seed": 5})
    per_seed = [training_pool(_spec(seed=s), tiny_retina) for s in (0, 1)]
    held = [training_pool(_spec(seed=s, train=fixed), tiny_retina) for s in (0, 1)]
    assert not np.array_equal(*per_seed) and np.array_equal(*held) and len(held[0]) == 160
    # Only set options enter the job key: a grid without them keeps its finished jobs.
    assert _spec().job_key == _spec(train=SETTINGS.model_copy(update={"select": "last"})).job_key
    assert _spec(train=fixed).job_key != _spec().job_key


def test_block_shuffle_reaches_every_split_the_loop_reads(tiny_retina, tmp_path, monkeypatch):
    import transfusion.train as train_module

    calls: list[tuple[int, int]] = []
    real = train_module.block_shuffle

    def recording(images: torch.Tensor, *, block: int) -> torch.Tensor:
        calls.append((len(images), block))
        return real(images, block=block)

    monkeypatch.setattr(train_module, "block_shuffle", recording)
    torch.set_num_threads(1)
    settings = SETTINGS.model_copy(update={"steps": 2, "eval_every": 2})
    run_training(_spec(block_shuffle=8, train=settings), tiny_retina, hooks=RecordingHooks(artifact_dir=tmp_path))
    assert {block for _, block in calls} == {8}
    sizes = [n for n, _ in calls]
    # Training batches (2 x 16), the probe set (16) at step 0 and the end, validation at
    # steps 0 and 2 and the test split (64 each), and the logged model's input example (2).
    assert sizes.count(16) >= 2 + 2 and sizes.count(64) >= 2 + 1 and 2 in sizes
    calls.clear()
    run_training(_spec(train=settings), tiny_retina, hooks=RecordingHooks(artifact_dir=tmp_path / "plain"))
    assert calls == []
