"""The paper's analyses on a small finished grid built from stored-artifact files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transfusion.analysis.convergence import ConvergenceSettings, convergence_table, steps_to_auc
from transfusion.analysis.plotting import panel_titles
from transfusion.analysis.records import JobRecord
from transfusion.analysis.report import analyze_records, write_report
from transfusion.analysis.similarity_figures import AnalysisSettings, RepresentationCache, figure2_data
from transfusion.analysis.tables import paper_auc, results_table
from transfusion.probes import save_probe

N = 64


def _probe(latent: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Layers that are noisy linear read-outs of ``latent`` (N x 6)."""

    def readout(width: int, spatial: int | None = None) -> np.ndarray:
        rep = latent @ rng.normal(size=(latent.shape[1], width)) + 0.1 * rng.normal(size=(len(latent), width))
        if spatial:
            rep = np.repeat(rep[:, :, None, None], spatial, axis=2).repeat(spatial, axis=3)
            rep = rep + 0.1 * rng.normal(size=rep.shape)
        return rep.astype(np.float16)

    return {
        "conv1": readout(8, 2),
        "stage1": readout(12, 2),
        "stage2": readout(16),
        "pool": readout(16),
        "logits": readout(1),
    }


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished-grid")
    rng = np.random.default_rng(0)
    shared = {"random": rng.normal(size=(N, 6)), "synthetic-transfer": rng.normal(size=(N, 6))}
    records = []
    for init, seeds in (("random", (0, 1, 2)), ("synthetic-transfer", (0, 1))):
        for seed in seeds:
            run = root / f"{init}-{seed}"
            final = _probe(shared[init], np.random.default_rng(100 + seed))
            start = _probe(rng.normal(size=(N, 6)), np.random.default_rng(200 + seed))
            save_probe(run / "probes" / "step-0.npz", start)
            save_probe(run / "probes" / "step-40.npz", final)
            (run / "filters").mkdir()
            np.save(run / "filters" / "step-0.npy", rng.normal(size=(8, 3, 5, 5)))
            np.save(run / "filters" / "step-40.npy", rng.normal(size=(8, 3, 5, 5)))
            speed = 10 if init == "random" else 5
            curve = tuple((s, min(0.99, 0.5 + 0.5 * s / (4 * speed))) for s in range(0, 41, 10))
            records.append(JobRecord(
                job_key=f"{init}{seed}", run_id=f"run-{init}-{seed}", model="cbr-tiny", init=init, data_size="full",
                seed=seed, status="FINISHED", val_curve=curve, probe_dir=run / "probes",
                metrics={"test/auc": 0.9 + 0.01 * seed, "test/auprc": 0.8, "time/train_s": 12.0,
                         "cost/params": 1.08e6, "cost/train_flops": 3e12, "time/gpu_s": 0.0},
            ))  # fmt: skip
    return root, records


def test_analyses_produce_every_table_and_figure(finished_grid, tmp_path):
    _, records = finished_grid
    outputs = analyze_records(records, tmp_path, grid_name="mini", dataset="synthetic-retina")
    md, html = write_report(outputs, title="mini report")
    expected = {
        "results.png": ["Test AUC (mean ± std over seeds)"],
        "figure2_similarity.png": ["svcca: top layers", "pwcca: top layers", "linear_cka: top layers"],
        "figure4_layer_movement.png": ["cbr-tiny (full)"],
        "figure5_convergence.png": ["cbr-tiny (full)"],
        "filters_conv1.png": ["cbr-tiny random: at init", "cbr-tiny random: after training",
                              "cbr-tiny synthetic-transfer: at init", "cbr-tiny synthetic-transfer: after training"],
    }  # fmt: skip
    for name, panels in expected.items():
        titles = panel_titles(tmp_path / name)
        assert titles == panels or (name == "results.png" and len(titles) == 1), (name, titles)
    text = md.read_text()
    for heading in ("Tables 1–3", "Figure 2", "Figure 4", "Figure 5", "First-layer filters"):
        assert heading in text
    page = html.read_text()
    assert page.count("data:image/png;base64,") == len(expected)
    assert "<table>" in page and "synthetic-transfer" in page
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    assert '"conv_method": "examples"' in (tmp_path / "analysis_settings.json").read_text()


def test_figure2_separates_rand_rand_from_rand_pretrained_and_decomposes_once(finished_grid):
    _, records = finished_grid
    cache = RepresentationCache(AnalysisSettings())
    rows = figure2_data(records, cache)
    by = {(r.comparison, r.measure): r for r in rows}
    for measure in ("svcca", "pwcca", "linear_cka"):
        assert by[("rand-rand", measure)].mean > by[("rand-pretrained", measure)].mean + 0.1
    assert by[("rand-rand", "svcca")].pairs == 3 and by[("rand-pretrained", "svcca")].pairs == 6
    # 5 runs x 2 top layers, each decomposed once however many pairs and measures use it.
    assert cache.decompositions == 10


def test_convergence_steps_to_threshold():
    assert steps_to_auc([(0, 0.5), (10, 0.8), (20, 0.92)], 0.91) == 20
    assert steps_to_auc([(0, 0.5), (10, 0.8)], 0.91) is None
    fast = JobRecord("a", "a", "m", "transfer", "full", 0, "FINISHED", val_curve=((0, 0.5), (10, 0.95), (20, 0.96)))
    slow = JobRecord("b", "b", "m", "random", "full", 0, "FINISHED", val_curve=((0, 0.5), (10, 0.7), (20, 0.96)))
    rows = {r.init: r for r in convergence_table([fast, slow], ConvergenceSettings(threshold=0.91, relative=False))}
    assert rows["transfer"].steps_mean == 10 and rows["random"].steps_mean == 20
    never = JobRecord("c", "c", "m", "mean-var", "full", 0, "FINISHED", val_curve=((0, 0.5), (20, 0.6)))
    rows = {r.init: r for r in convergence_table([never], ConvergenceSettings(threshold=0.91, relative=False))}
    assert math.isnan(rows["mean-var"].steps_mean) and rows["mean-var"].reached == 0


def test_results_table_over_seeds_and_paper_numbers(finished_grid):
    _, records = finished_grid
    rows = {r.init: r for r in results_table(records)}
    assert rows["random"].seeds == 3
    assert rows["random"].auc_mean == pytest.approx(0.91)
    assert rows["random"].auc_std == pytest.approx(np.std([0.90, 0.91, 0.92], ddof=1))
    assert paper_auc("resnet50", "random", "full") == 96.4
    assert paper_auc("resnet50", "synthetic-transfer", "full") is None
