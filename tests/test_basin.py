"""Same basin? and how far from the source: interpolation, barriers, pairs, and the report sections,
all from weights and probes the test writes (nothing is trained here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import transfusion.train as train
from transfusion.analysis.basin import (
    BASIN_TITLE,
    CURVES_FILE,
    DatasetLocation,
    InterpolationInputs,
    PairKind,
    barrier,
    interpolate_pairs,
    interpolate_state,
    interpolation_alphas,
    interpolation_curve,
    interpolation_pairs,
    read_curves,
)
from transfusion.analysis.records import JobRecord
from transfusion.analysis.report import analyze_records, write_report
from transfusion.analysis.representations import AnalysisSettings, RepresentationCache
from transfusion.analysis.source_distance import SOURCE_DISTANCE_TITLE, source_distance_markdown, source_distance_rows
from transfusion.config import JobSpec, TrainSettings
from transfusion.models import create_model
from transfusion.probes import capture_activations, save_probe

SETTINGS = TrainSettings(steps=8, batch_size=16, eval_every=4, resolution=32, probe_size=16, eval_batch_size=64)
OPTIONS = {"train": 240, "val": 64, "test": 64}


def _spec(init: str = "random", seed: int = 0, block: str = "none") -> JobSpec:
    pretrained = "/unused/source.pt" if init == "imagenet" else None
    return JobSpec(model="cbr-tiny", init=init, pretrained=pretrained, dataset="synthetic-retina", data_size="full",
                   seed=seed, dataset_options=OPTIONS, train=SETTINGS, block_shuffle=block)  # fmt: skip


def _weights(seed: int, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A cbr-tiny's weights drawn under ``seed``, batch-norm affine moved off identity (as training moves it)."""
    torch.manual_seed(seed)
    model = create_model("cbr-tiny", num_classes=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * scale * torch.randn_like(p))
    return model.state_dict()


def _record(spec: JobSpec, **fields) -> JobRecord:
    fields = {"metrics": {"test/auc": 0.5}, **fields}
    return JobRecord(job_key=spec.job_key, run_id=f"run-{spec.init}-{spec.block_shuffle}-{spec.seed}",
                     model=spec.model, init=spec.init_label, data_size=str(spec.data_size), seed=spec.seed,
                     status="FINISHED", block_shuffle=str(spec.block_shuffle), **fields)  # fmt: skip


# ----------------------------------------------------------------------------- the math


def test_interpolated_state_is_each_endpoint_exactly_and_refuses_another_architecture():
    a, b = _weights(0), _weights(1)
    start, end, middle = (interpolate_state(a, b, alpha) for alpha in (0.0, 1.0, 0.5))
    assert all(torch.equal(start[k], a[k]) and torch.equal(end[k], b[k]) for k in a)
    weight = "stage1.0.weight"
    torch.testing.assert_close(middle[weight], (a[weight] + b[weight]) / 2)
    counter = next(k for k in a if k.endswith("num_batches_tracked"))
    assert torch.equal(middle[counter], a[counter])  # integers are not interpolated
    with pytest.raises(ValueError, match="differ in tensors"):
        interpolate_state(a, {k: v for k, v in b.items() if k != weight}, 0.5)
    wider = create_model("cbr-small", num_classes=1).state_dict()
    with pytest.raises(ValueError, match="shape"):
        interpolate_state(a, {k: wider.get(k, v) if wider.get(k, v).shape != v.shape else v for k, v in b.items()}, 0.5)


def test_barrier_is_zero_for_a_flat_or_convex_path_and_measures_a_dip():
    assert barrier([0.8] * 11) == 0.0  # two copies of one run
    assert barrier(np.linspace(0.7, 0.9, 11)) == pytest.approx(0.0, abs=1e-15)  # the straight line itself
    assert barrier([0.7, 0.85, 0.9]) == 0.0  # above the chord: no barrier, never negative
    # A dip to 0.6 midway between ends at 0.8 and 0.9: the chord is at 0.85 there.
    assert barrier([0.8, 0.7, 0.6, 0.75, 0.9]) == pytest.approx(0.25)
    # Loss: lower is better, so the barrier is the rise above the chord.
    assert barrier([0.3, 0.9, 0.5], higher_is_better=False) == pytest.approx(0.5)
    assert barrier([0.3, 0.9, 0.5]) == 0.0
    # Uneven alphas: the chord is read at each value's own alpha.
    assert barrier([1.0, 0.0, 0.0], alphas=[0.0, 0.1, 1.0]) == pytest.approx(0.9)
    assert barrier([1.0, 0.0, 0.0]) == pytest.approx(0.5)
    assert interpolation_alphas(11)[5] == 0.5 and interpolation_alphas(11)[-1] == 1.0
    with pytest.raises(ValueError, match="interpolation_points"):
        AnalysisSettings(interpolation_points=2)


def test_pairs_follow_the_stated_rule():
    records = [_record(_spec(init, seed, block)) for init in ("random", "imagenet") for seed in (0, 1, 2)
               for block in ("none", "8")]  # fmt: skip
    pairs = interpolation_pairs(records, max_pairs=3)
    unshuffled = [p for p in pairs if p.cell[2] == "none"]
    seeds = {kind: [(p.first.seed, p.second.seed) for p in unshuffled if p.kind is kind] for kind in PairKind}
    # Closest seeds first; transfer-random never pairs a seed with itself (shared data order) and is cyclic.
    assert seeds[PairKind.RANDOM_RANDOM] == seeds[PairKind.TRANSFER_TRANSFER] == [(0, 1), (1, 2), (0, 2)]
    assert seeds[PairKind.TRANSFER_RANDOM] == [(0, 1), (1, 2), (2, 0)]
    transfer_random = [p for p in unshuffled if p.kind is PairKind.TRANSFER_RANDOM]
    assert all(p.first.init == "transfer@source" and p.second.init == "random" for p in transfer_random)
    # Block sizes are never mixed: each has its own pairs.
    assert all(p.first.block_shuffle == p.second.block_shuffle for p in pairs) and len(pairs) == 2 * len(unshuffled)
    capped = interpolation_pairs(records, max_pairs=1)
    assert [(p.kind, p.first.seed, p.second.seed) for p in capped if p.cell[2] == "none"] == [
        (PairKind.RANDOM_RANDOM, 0, 1), (PairKind.TRANSFER_TRANSFER, 0, 1), (PairKind.TRANSFER_RANDOM, 0, 1),
    ]  # fmt: skip
    # One seed of an init: no pair of that kind.
    assert not [p for p in interpolation_pairs(records[:1], max_pairs=3)]


# ----------------------------------------------------------------------------- on real data


def test_interpolation_ends_reproduce_each_runs_recalibrated_test_auc_and_one_run_has_no_barrier(tiny_retina):
    torch.set_num_threads(1)
    spec, a, b = _spec(), _weights(0), _weights(1, scale=2.0)
    aucs, losses = interpolation_curve(spec, tiny_retina, a, b, alphas=(0.0, 0.5, 1.0))
    test = tiny_retina.indices("test")
    for alpha_index, weights in ((0, a), (2, b)):
        model = train.create_job_model(spec, tiny_retina).to(memory_format=torch.channels_last)
        model.load_state_dict(weights)
        train.recalibrate_batch_norm(model, train.init_bn_batches(spec, tiny_retina, torch.device("cpu"), model))
        metrics = train.evaluate(model, tiny_retina, test, prefix="test", batch_size=spec.train.eval_batch_size,
                                 device=torch.device("cpu"))  # fmt: skip
        assert aucs[alpha_index] == pytest.approx(metrics["test/auc"], abs=1e-6)
    assert math.isfinite(losses[1]) and losses[1] > 0
    assert aucs[0] != aucs[2]  # two different networks

    same_aucs, same_losses = interpolation_curve(spec, tiny_retina, a, a, alphas=interpolation_alphas(5))
    assert barrier(same_aucs) == 0.0 and barrier(same_losses, higher_is_better=False) == 0.0
    assert same_aucs[0] == pytest.approx(aucs[0], abs=1e-6)


def test_the_basin_section_reads_stored_weights_only_and_reuses_its_curves(tiny_retina, tmp_path, monkeypatch):
    torch.set_num_threads(1)

    def no_training(*_args, **_kwargs):
        raise AssertionError("the analysis trained")

    monkeypatch.setattr(train, "run_training", no_training)
    monkeypatch.setattr(train, "train_one_step", no_training)
    specs = [_spec(init, seed) for init in ("random", "imagenet") for seed in (0, 1)]
    records, weights = [], {}
    for i, spec in enumerate(specs):
        record = _record(spec)
        weights[record.run_id] = tmp_path / f"{record.run_id}.pt"
        # Transfer runs stay close to one another (one source), random runs do not.
        torch.save(_weights(7 if spec.init == "imagenet" else 10 + i, scale=1.0 + 0.1 * spec.seed),
                   weights[record.run_id])  # fmt: skip
        records.append(record)
    fetched: list[str] = []

    def final_weights(run_id: str):
        fetched.append(run_id)
        return weights[run_id]

    inputs = InterpolationInputs(
        {s.job_key: s for s in specs}, final_weights, lambda: DatasetLocation(str(tiny_retina.root))
    )
    settings = AnalysisSettings(interpolation_points=3, executor="serial")
    out = tmp_path / "report"
    outputs = analyze_records(records, out, grid_name="toy", dataset="synthetic-retina", settings=settings,
                              interpolation=inputs)  # fmt: skip
    assert outputs.interpolations == 4  # random-random, transfer-transfer, and transfer-random both ways
    assert sorted(set(fetched)) == sorted(weights)
    titles = [title for title, _, _ in outputs.sections]
    assert BASIN_TITLE in titles
    text = dict((t, m) for t, m, _ in outputs.sections)[BASIN_TITLE]
    assert (
        "| cbr-tiny | full | random–random | 1 |" in text and "| cbr-tiny | full | transfer@source–random | 2 |" in text
    )
    assert "| cbr-tiny | full | transfer@source–transfer@source | 1 |" in text and "| no barrier |" in text
    assert "Neyshabur" in text and "the closest seeds first" in text
    curves = read_curves(out / CURVES_FILE)
    assert len(curves) == 4 and all(len(c.aucs) == 3 for c in curves)
    md, _ = write_report(outputs, title="toy")
    assert "![basin_interpolation.png](basin_interpolation.png)" in md.read_text()

    # Again: every curve is stored, so neither weights nor data are read.
    def unreachable(*_args):
        raise AssertionError("read again")

    again = analyze_records(records, out, grid_name="toy", dataset="synthetic-retina", settings=settings,
                            interpolation=InterpolationInputs(inputs.jobs, unreachable, unreachable))  # fmt: skip
    assert again.interpolations == 0
    assert dict((t, m) for t, m, _ in again.sections)[BASIN_TITLE] == text

    # Other alphas are another computation: stored curves are not reused for them.
    def not_stored(run_id: str):
        raise FileNotFoundError(f"run {run_id} has no checkpoint/model.pt")

    elsewhere = InterpolationInputs(inputs.jobs, not_stored, unreachable)
    stored = read_curves(out / CURVES_FILE)
    other = interpolate_pairs(records, elsewhere, AnalysisSettings(interpolation_points=5), known=stored)
    assert len(other.curves) == 4 and all(c.error.startswith("no stored final weights: run ") for c in other.curves)


def _probe(weights: dict[str, torch.Tensor], images: torch.Tensor, path):
    model = create_model("cbr-tiny", num_classes=1)
    model.load_state_dict(weights)
    return save_probe(path, capture_activations(model, images))


def test_how_far_from_the_source_reads_logged_distances_and_source_probes(tiny_retina, tmp_path):
    torch.set_num_threads(1)
    images = train.load_images(tiny_retina, tiny_retina.indices("val")[:64], torch.device("cpu"))
    source = _weights(3)
    records = []
    for seed, moved in ((0, _weights(3, scale=0.5)), (1, source)):  # seed 1 never moved from its source
        probes = tmp_path / f"s{seed}" / "probes"
        probes.mkdir(parents=True)
        _probe(source, images, probes / "source.npz")
        _probe(moved, images, probes / "step-8.npz")
        metrics = {"test/auc": 0.5, "distance/conv1": 0.1 * seed, "distance/stage1": 0.2, "distance/stage2": 0.3}
        records.append(_record(_spec("imagenet", seed), metrics=metrics, probe_dir=probes))
    random_metrics = {"test/auc": 0.5, "distance/conv1": 0.4}
    records.append(_record(_spec("random", 0), metrics=random_metrics))

    rows = source_distance_rows(records, RepresentationCache(AnalysisSettings()))
    by = {(r.init, r.layer): r for r in rows}
    assert by[("random", "conv1")].distances == (0.4,) and by[("random", "conv1")].source_runs == 0
    conv1 = by[("transfer@source", "conv1")]
    assert conv1.distances == (0.0, 0.1) and conv1.source_runs == 2
    assert 0.5 < conv1.source_similarity <= 1.0 + 1e-9 and conv1.chance < conv1.source_similarity
    # stage3: probed, never logged as a distance here -- the row says so rather than inventing one.
    assert by[("transfer@source", "stage3")].distances == () and by[("transfer@source", "stage3")].source_runs == 2
    text = source_distance_markdown(rows)
    assert "| cbr-tiny | full | random | conv1 | 0.400 ± – (1) | – | 0 | – | – |" in text
    assert "n/a (not logged)" in text and "CKA(source, trained)" in text

    outputs = analyze_records(records, tmp_path / "report", grid_name="toy", dataset="synthetic-retina")
    titles = [title for title, _, _ in outputs.sections]
    assert SOURCE_DISTANCE_TITLE in titles and BASIN_TITLE not in titles  # no interpolation inputs given


@pytest.mark.slow
def test_ray_interpolation_equals_the_serial_path(tiny_retina, tmp_path, ray_cluster):
    from transfusion.analysis.basin import InterpolationTask, InterpolationWork, SerialInterpolation
    from transfusion.launcher import RayAnalysisExecutor

    paths = []
    for seed in (0, 1, 2):
        paths.append(tmp_path / f"{seed}.pt")
        torch.save(_weights(seed), paths[-1])
    location = DatasetLocation(str(tiny_retina.root))
    work = [
        InterpolationWork(InterpolationTask(_spec(block=block), f"a{i}", f"b{i}", (0.0, 0.5, 1.0), location),
                          paths[i], paths[i + 1], cell=("cbr-tiny", "full", block))
        for i, block in ((0, "none"), (1, "none"), (0, "8"))
    ]  # fmt: skip
    serial = SerialInterpolation().interpolate(work)
    fanned = RayAnalysisExecutor(groups_in_flight=1).interpolate(work)
    assert [c.first_run for c in fanned] == ["a0", "a1", "a0"] and not any(c.error for c in fanned)
    for a, b in zip(serial, fanned, strict=True):
        assert a.aucs == pytest.approx(b.aucs, abs=1e-6) and a.losses == pytest.approx(b.losses, rel=1e-5)
    assert serial[0].aucs != serial[2].aucs  # the block-shuffled cell scores other images


def test_interpolation_knobs_are_analysis_only_grid_fields():
    from pydantic import ValidationError

    from tasks.analysis import analysis_settings
    from transfusion.config import GridSpec, load_grid

    grid = load_grid("what-transfers-cpu")
    assert (grid.interpolation_points, grid.interpolation_pairs) == (11, 1)
    changed = GridSpec.model_validate({**grid.model_dump(mode="json"), "interpolation_points": 21,
                                       "interpolation_pairs": 2})  # fmt: skip
    # How a grid is analysed: neither its parent run nor any job's identity changes.
    assert changed.grid_key == grid.grid_key
    assert [j.job_key for j in changed.jobs()] == [j.job_key for j in grid.jobs()]
    assert analysis_settings(changed) == AnalysisSettings(interpolation_points=21, interpolation_pairs=2)
    with pytest.raises(ValidationError, match="interpolation_points must be 0"):
        GridSpec.model_validate({**grid.model_dump(mode="json"), "interpolation_points": 2})
