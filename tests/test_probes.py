"""Probe sampling: enough unpooled (image, position) rows per layer, the same rows for every run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfusion.config import GridSpec
from transfusion.models import MODELS
from transfusion.presets import PRESETS
from transfusion.probes import (
    MIN_ROWS_PER_DIM,
    ProbeSampling,
    capture_activations,
    image_groups,
    load_probe,
    probe_layers,
    probe_plan,
    probe_sampling,
    sample_positions,
    save_probe,
    stored_dtype_note,
)


def _preset_models() -> list[tuple[str, str]]:
    return [(preset, model) for preset in PRESETS.names() for model in PRESETS.get(preset)()["models"]]


@pytest.mark.parametrize(("preset", "model"), _preset_models(), ids=lambda v: v)
def test_every_analysed_layer_of_every_preset_has_ten_rows_per_dim(preset: str, model: str) -> None:
    grid = GridSpec.model_validate(PRESETS.get(preset)())
    t = grid.train
    sampling = ProbeSampling(rows_per_channel=t.probe_rows_per_channel, seed=t.probe_seed)
    plans = probe_plan(model, resolution=t.resolution, probe_size=t.probe_size, sampling=sampling)
    assert [p.layer for p in plans][0] == "conv1" and len(plans) >= 4
    for plan in plans:
        assert plan.rows_per_dim >= MIN_ROWS_PER_DIM, f"{preset}/{model}/{plan.layer}: {plan}"
        if model in ("resnet50", "inception-v3") and plan.layer == "stage4":
            assert plan.rows >= 20480
    # The probe set fits the validation split it is drawn from.
    val = grid.dataset_options.get("val")
    if val is not None:
        assert t.probe_size <= val


def test_sample_positions_are_seeded_spread_over_images_and_distinct() -> None:
    sampling = ProbeSampling(rows_per_channel=10, seed=3)
    rows = sample_positions("stage2", images=8, height=6, width=5, channels=12, sampling=sampling)
    assert rows.shape == (8 * 15, 3) and rows.dtype == np.int32
    assert np.array_equal(np.bincount(rows[:, 0]), np.full(8, 15))
    assert len({tuple(r) for r in rows}) == len(rows)
    # Every image at the same positions, so a chance pairing can keep the position.
    per_image = rows[:, 1:].reshape(8, 15, 2)
    assert (per_image == per_image[:1]).all()
    assert rows[:, 1].max() < 6 and rows[:, 2].max() < 5
    again = sample_positions("stage2", images=8, height=6, width=5, channels=12, sampling=sampling)
    assert np.array_equal(rows, again)
    other_layer = sample_positions("stage3", images=8, height=6, width=5, channels=12, sampling=sampling)
    assert not np.array_equal(rows, other_layer)
    # Too few positions: every position of every image, and no more.
    everything = sample_positions("conv1", images=2, height=2, width=2, channels=64, sampling=sampling)
    assert len(everything) == 8


def test_conv1_rows_are_unpooled_and_identical_across_runs(tmp_path) -> None:
    """Two runs (different weights) keep the same (image, h, w) rows, read straight off the full-resolution map."""
    images = torch.randn(12, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    sampling = ProbeSampling(rows_per_channel=10, seed=0)
    probes, conv1_maps = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = MODELS.get("cbr-tiny")(num_classes=2).eval()
        probe = capture_activations(model, images, sampling=sampling, batch_size=5)
        with torch.no_grad():
            conv1_maps.append(model.conv1(images))
        probes.append(load_probe(save_probe(tmp_path / f"run{seed}" / "step-0.npz", probe)))
    first, second = probes
    assert probe_sampling(first) == sampling
    assert set(probe_layers(first)) == {"conv1", "stage1", "stage2", "stage3", "pool", "logits"}
    sides = {"conv1": 24, "stage1": 12, "stage2": 6, "stage3": 3}  # cbr-tiny at 48 px
    for layer, side in sides.items():
        assert np.array_equal(first[layer + ".rows"], second[layer + ".rows"])
        assert first[layer].dtype == np.float16
        channels = first[layer].shape[1]
        # ceil(10 x channels / 12 images) positions per image, or all of a small map
        assert first[layer].shape[0] == 12 * min(side * side, -(-MIN_ROWS_PER_DIM * channels // 12))
    assert first["conv1"].shape[0] >= MIN_ROWS_PER_DIM * first["conv1"].shape[1]
    assert not np.allclose(first["conv1"], second["conv1"])
    rows = first["conv1.rows"]
    conv1 = conv1_maps[0]
    assert conv1.shape[-1] == 24  # 48 px, stride 2: the unpooled map
    expected = conv1[rows[:, 0], :, rows[:, 1], rows[:, 2]].numpy().astype(np.float16)
    np.testing.assert_array_equal(first["conv1"], expected)
    assert rows[:, 1].max() > 4 and rows[:, 2].max() > 4  # positions beyond any 4 x 4 pooling grid
    np.testing.assert_array_equal(image_groups(first, "conv1"), rows[:, 0])
    assert image_groups(first, "pool") is None
    assert first["pool"].shape == (12, 256)


def test_sampling_rule_is_validated() -> None:
    with pytest.raises(ValueError, match="rows_per_channel must be a positive integer"):
        ProbeSampling(rows_per_channel=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        ProbeSampling(seed=-1)


def test_a_value_beyond_fp16_is_stored_in_fp32_and_said_so(tmp_path) -> None:
    """fp16 tops out at 65504: a layer holding 1e6 keeps fp32 (never inf); the others stay fp16."""
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = MODELS.get("cbr-tiny")(num_classes=2).eval()
    # stage3's output far beyond fp16 (this hook runs before the capturing one).
    model.capture_modules()["stage3"].register_forward_hook(lambda _module, _inputs, output: output * 1e6)
    probe = load_probe(save_probe(tmp_path / "step-0.npz", capture_activations(model, images, batch_size=4)))
    assert probe["stage3"].dtype == np.float32 and np.isfinite(probe["stage3"]).all()
    assert np.abs(probe["stage3"]).max() > 1e6
    assert "exceeds fp16's 65504" in stored_dtype_note(probe, "stage3")
    assert "stage3.dtype" not in probe_layers(probe) and "stage3" in probe_layers(probe)
    for layer in ("conv1", "stage1", "stage2"):  # before the large values: fp16, no note
        assert probe[layer].dtype == np.float16 and stored_dtype_note(probe, layer) == ""
