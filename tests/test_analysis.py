"""The paper's analyses on a small finished grid built from stored-artifact files."""

from __future__ import annotations

import json
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


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matrices: a second thread only adds spin-waiting (100x slower on a loaded 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _probe(latent: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Layers that are noisy linear read-outs of ``latent`` (N x 6), stored as training stores them.

    Conv layers are (image, position) rows with their ``.rows`` index; stage2 is flat
    with 64 rows for 16 features, rows/dims 4: "too few rows".
    """

    def readout(width: int, positions: int | None = None) -> np.ndarray:
        rep = latent @ rng.normal(size=(latent.shape[1], width)) + 0.1 * rng.normal(size=(len(latent), width))
        if positions:
            rep = np.repeat(rep, positions, axis=0) + 0.1 * rng.normal(size=(len(latent) * positions, width))
        return rep.astype(np.float16)

    def rows(positions: int) -> np.ndarray:
        image = np.repeat(np.arange(N), positions)
        return np.stack([image, np.tile(np.arange(positions), N), np.zeros_like(image)], axis=1).astype(np.int32)

    return {
        "conv1": readout(8, 2),
        "conv1.rows": rows(2),
        "stage1": readout(12, 2),
        "stage1.rows": rows(2),
        "stage2": readout(16),
        "pool": readout(16),
        "logits": readout(1),
        "sampling": np.array(json.dumps({"rows_per_channel": 10, "seed": 0})),
    }


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished-grid")
    rng = np.random.default_rng(0)
    shared = {"random": rng.normal(size=(N, 6)), "synthetic-transfer": rng.normal(size=(N, 6))}
    records = []
    for init, seeds in (("random", (0, 1, 2)), ("synthetic-transfer", (0, 1, 2))):
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
        "transfer_forest.png": ["Does transfer help? ΔAUC per cell"],
    }  # fmt: skip
    for name, panels in expected.items():
        titles = panel_titles(tmp_path / name)
        assert titles == panels or (name == "results.png" and len(titles) == 1), (name, titles)
    text = md.read_text()
    for heading in ("Tables 1–3", "Figure 2", "Figure 4", "Figure 5", "First-layer filters"):
        assert heading in text
    # The report opens with its summary, generated from the tables below it.
    assert text.index("## Summary") < text.index("## Does transfer help?") < text.index("## Tables 1–3")
    summary = text[text.index("## Summary") : text.index("## Does transfer help?")]
    assert "cbr-tiny at full data: synthetic-transfer" in summary and "What was run: grid mini" in summary
    assert "nan" not in summary.lower()
    page = html.read_text()
    assert page.count("data:image/png;base64,") == len(expected)
    assert "<table>" in page and "synthetic-transfer" in page
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    logged = json.loads((tmp_path / "analysis_settings.json").read_text())
    assert logged["similarity"]["conv_method"] == "examples"
    assert list(logged["probe_sampling"].values()) == [{"rows_per_channel": 10, "seed": 0}]
    # 5 runs x 2 steps x 3 layers: one decomposition each for Figures 2, 4 and the seed table together.
    assert outputs.decompositions == logged["decompositions"] == 36
    assert logged["similarity_executors"] == ["serial"]


def _table(text: str, header_start: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    body = []
    for line in lines[start + 2 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header) or cells == header:
            break
        body.append(dict(zip(header, cells, strict=True)))
    return body


def test_similarity_tables_carry_rows_per_dim_and_chance_and_mark_too_few_rows(finished_grid, tmp_path):
    _, records = finished_grid
    outputs = analyze_records(records, tmp_path, grid_name="mini", dataset="synthetic-retina")
    sections = {title.split(":")[0]: text for title, text, _ in outputs.sections}
    figure4 = _table(sections["Figure 4"], "| model | data size | layer | init |")
    assert {"rows/dims", "chance"} <= set(figure4[0])
    by_layer = {(r["layer"], r["init"]): r for r in figure4}
    assert by_layer[("conv1", "random")]["rows/dims"] == "16.0"
    assert by_layer[("stage2", "random")]["rows/dims"] == "4.0"
    for (layer, _), row in by_layer.items():
        marked = row["similarity(init, trained)"].startswith("too few rows")
        assert marked == (layer == "stage2"), row
        chance = float(row["chance"].split(" ± ")[0])
        assert 0.0 < chance < 0.6
    # Unrelated init vs trained latents here: every value is near its chance level, not near 1.
    assert all(float(r["similarity(init, trained)"].split(": ")[-1].split(" ± ")[0]) < 0.6 for r in figure4)

    figure2 = _table(sections["Figure 2"], "| model | data size | comparison |")
    assert {r["measure"] for r in figure2} == {"svcca", "pwcca", "linear_cka"}
    for row in figure2:  # top two layers averaged: stage1 and the too-few stage2
        assert row["rows/dims"] == "4.0" and row["mean ± std"].startswith("too few rows")
        assert float(row["chance"].split(" ± ")[0]) < float(row["mean ± std"].split(": ")[1].split(" ± ")[0])
    seeds = _table(sections["Top-layer SVCCA between seeds"], "| model | init |")
    assert {"rows/dims", "chance"} <= set(seeds[0]) and seeds[0]["svcca mean ± std"].startswith("too few rows")


def test_figures_draw_chance_bands_and_hollow_too_few_rows(finished_grid, tmp_path, monkeypatch):
    from transfusion.analysis import similarity_figures

    figures = {}

    def keep(fig, path, **_):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(similarity_figures, "save_figure", keep)
    _, records = finished_grid
    cache = RepresentationCache(AnalysisSettings())
    similarity_figures.plot_figure2(figure2_data(records, cache), tmp_path / "f2.png")
    similarity_figures.plot_figure4(similarity_figures.figure4_data(records, cache), tmp_path / "f4.png")
    for name, fig in figures.items():
        for ax in fig.axes:
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert any("chance" in label for label in labels), (name, labels)
            assert any(type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection") for c in ax.collections)
    bars = [p for ax in figures["f2.png"].axes for p in ax.patches]
    assert bars and all(p.get_facecolor()[3] == 0 for p in bars)  # all top-layer values have too few rows
    markers = [c for ax in figures["f4.png"].axes for c in ax.collections if type(c).__name__ == "PathCollection"]
    hollow = [c for c in markers if len(c.get_offsets()) and c.get_facecolor().size == 0]
    assert hollow  # stage2's markers


def test_figure2_separates_rand_rand_from_rand_pretrained_and_decomposes_once(finished_grid):
    _, records = finished_grid
    cache = RepresentationCache(AnalysisSettings())
    rows = figure2_data(records, cache)
    by = {(r.comparison, r.measure): r for r in rows}
    for measure in ("svcca", "pwcca", "linear_cka"):
        assert by[("rand-rand", measure)].mean > by[("rand-pretrained", measure)].mean + 0.1
    assert by[("rand-rand", "svcca")].pairs == 3 and by[("rand-pretrained", "svcca")].pairs == 3
    # The pairs (s < t) read random 0..2 and transfer 1, 2 (transfer seed 0 is never the higher seed):
    # 5 runs x 2 top layers, each decomposed once however many pairs and measures use it.
    assert cache.decompositions == 10


def test_figure2_pairs_distinct_seeds_by_one_rule_for_both_comparisons(finished_grid):
    """Same-seed runs share the training subset, batch order and augmentation: never a Figure 2 pair."""
    from transfusion.analysis.similarity_figures import FIGURE2_PAIRING, figure2_markdown, figure2_requests

    _, records = finished_grid
    assert sorted({r.seed for r in records}) == [0, 1, 2]
    run_of = {r.probe_dir: r for r in records}
    pairs: dict[str, set[tuple[int, int]]] = {}
    for request in figure2_requests(records, RepresentationCache(AnalysisSettings())):
        a, b = run_of[request.a.parent], run_of[request.b.parent]
        assert a.init == "random"
        pairs.setdefault("rand-rand" if b.init == "random" else "rand-pretrained", set()).add((a.seed, b.seed))
    assert all(s != t for kind in pairs.values() for s, t in kind)
    # One rule for both: each pair of distinct seeds once, random run of the lower seed first.
    assert pairs["rand-rand"] == pairs["rand-pretrained"] == {(0, 1), (0, 2), (1, 2)}
    rows = figure2_data(records, RepresentationCache(AnalysisSettings()))
    assert {r.comparison: r.pairs for r in rows} == {"rand-rand": 3, "rand-pretrained": 3}
    assert f"Pairs: {FIGURE2_PAIRING}." in figure2_markdown(rows)


def test_figure2_compares_random_init_with_each_source_on_its_own(tmp_path):
    rng = np.random.default_rng(7)
    records = []
    for init in ("random", "transfer@a", "transfer@b"):
        latent = rng.normal(size=(N, 6))
        for seed in (0, 1):
            run = tmp_path / f"{init}-{seed}"
            save_probe(run / "probes" / "step-40.npz", _probe(latent, np.random.default_rng(seed)))
            records.append(JobRecord(f"{init}{seed}", f"run-{init}-{seed}", "cbr-tiny", init, "full", seed, "FINISHED",
                                     probe_dir=run / "probes"))  # fmt: skip
    rows = figure2_data(records, RepresentationCache(AnalysisSettings()))
    assert {(r.comparison, r.pairs) for r in rows} == {
        ("rand-rand", 1), ("rand-pretrained@a", 1), ("rand-pretrained@b", 1)
    }  # fmt: skip


def test_convergence_steps_to_threshold():
    # Interpolated between steps 10 (0.8) and 20 (0.92).
    assert steps_to_auc([(0, 0.5), (10, 0.8), (20, 0.92)], 0.91) == pytest.approx(10 + 10 * 0.11 / 0.12)
    assert steps_to_auc([(0, 0.5), (10, 0.8)], 0.91) is None
    fast = JobRecord("a", "a", "m", "transfer", "full", 0, "FINISHED", val_curve=((0, 0.5), (10, 0.95), (20, 0.96)))
    slow = JobRecord("b", "b", "m", "random", "full", 0, "FINISHED", val_curve=((0, 0.5), (10, 0.7), (20, 0.96)))
    rows = {r.init: r for r in convergence_table([fast, slow], ConvergenceSettings(threshold=0.91, relative=False))}
    assert rows["transfer"].steps_median == pytest.approx(10 * 0.41 / 0.45)
    assert rows["random"].steps_median == pytest.approx(10 + 10 * 0.21 / 0.26)
    never = JobRecord("c", "c", "m", "mean-var", "full", 0, "FINISHED", val_curve=((0, 0.5), (20, 0.6)))
    rows = {r.init: r for r in convergence_table([never], ConvergenceSettings(threshold=0.91, relative=False))}
    assert rows["mean-var"].reached == 0 and rows["mean-var"].median_censored and rows["mean-var"].steps_text == "> 20"


def test_results_table_over_seeds_and_paper_numbers(finished_grid):
    _, records = finished_grid
    rows = {r.init: r for r in results_table(records)}
    assert rows["random"].seeds == 3
    assert rows["random"].auc_mean == pytest.approx(0.91)
    assert rows["random"].auc_std == pytest.approx(np.std([0.90, 0.91, 0.92], ddof=1))
    assert paper_auc("resnet50", "random", "full") == 96.4
    assert paper_auc("resnet50", "synthetic-transfer", "full") is None


@pytest.mark.slow
def test_ray_fan_out_equals_the_serial_path(finished_grid, ray_cluster):
    from transfusion.launcher import RayAnalysisExecutor

    _, records = finished_grid
    serial = RepresentationCache(AnalysisSettings(executor="serial"))
    fanned = RepresentationCache(AnalysisSettings(), executor=RayAnalysisExecutor(groups_in_flight=2))
    expected, got = figure2_data(records, serial), figure2_data(records, fanned)
    assert fanned.executors_used == {"ray"} and fanned.decompositions == serial.decompositions == 10
    for a, b in zip(expected, got, strict=True):
        assert (a.model, a.comparison, a.measure, a.pairs) == (b.model, b.comparison, b.measure, b.pairs)
        assert b.mean == pytest.approx(a.mean, abs=1e-9) and b.chance == pytest.approx(a.chance, abs=1e-9)


def test_a_layer_dead_at_init_is_named_in_figure4_not_left_blank(tmp_path):
    """Mean-Var init can switch every ReLU of a layer off at init: the row says so instead of a bare n/a."""
    from transfusion.analysis.similarity_figures import figure4_data, figure4_markdown

    rng = np.random.default_rng(3)
    latent = rng.normal(size=(N, 6))
    records = []
    for seed in (0, 1):
        run = tmp_path / f"mean-var-{seed}"
        start = _probe(rng.normal(size=(N, 6)), np.random.default_rng(seed))
        start["stage1"] = np.zeros_like(start["stage1"])
        save_probe(run / "probes" / "step-0.npz", start)
        save_probe(run / "probes" / "step-40.npz", _probe(latent, np.random.default_rng(10 + seed)))
        records.append(JobRecord(
            job_key=f"mv{seed}", run_id=f"run-mv-{seed}", model="cbr-tiny", init="mean-var", data_size="full",
            seed=seed, status="FINISHED", val_curve=((0, 0.5), (40, 0.9)), probe_dir=run / "probes", metrics={},
        ))  # fmt: skip
    rows = {r.layer: r for r in figure4_data(records, RepresentationCache(AnalysisSettings()))}
    assert rows["stage1"].runs == 0 and rows["stage1"].note == "at init: every feature constant, a dead layer"
    assert rows["conv1"].runs == 2 and rows["conv1"].note == ""
    table = _table(figure4_markdown(list(rows.values())), "| model | data size | layer | init |")
    values = {r["layer"]: r["similarity(init, trained)"] for r in table}
    assert values["stage1"] == "n/a (at init: every feature constant, a dead layer)"
    assert "(" not in values["conv1"]


def test_probes_with_different_rows_are_not_compared(tmp_path):
    """Same row count and images, other positions (another probe_seed): no value, and the reason says so."""
    from transfusion.analysis.representations import seed_similarity, seed_similarity_markdown

    rng = np.random.default_rng(4)
    latent = rng.normal(size=(N, 6))
    records = []
    for seed in (0, 1):
        probe = _probe(latent, np.random.default_rng(20 + seed))
        if seed == 1:
            probe["stage1.rows"] = probe["stage1.rows"].copy()
            probe["stage1.rows"][:, 1] = 1 - probe["stage1.rows"][:, 1]  # same images, positions swapped
        run = tmp_path / f"random-{seed}"
        save_probe(run / "probes" / "step-40.npz", probe)
        records.append(JobRecord(
            job_key=f"r{seed}", run_id=f"run-r-{seed}", model="cbr-tiny", init="random", data_size="full",
            seed=seed, status="FINISHED", val_curve=((0, 0.5), (40, 0.9)), probe_dir=run / "probes", metrics={},
        ))  # fmt: skip
    cache = RepresentationCache(AnalysisSettings())
    a, b = (r.probe_dir / "step-40.npz" for r in records)
    same = cache.pair(a, b, "conv1", measures=("svcca",))
    assert same.undefined == "" and same.scores["svcca"].score > 0.5
    swapped = cache.pair(a, b, "stage1", measures=("svcca",))
    assert math.isnan(swapped.scores["svcca"].score)
    assert swapped.undefined == "probes differ in rows (image, h, w): a different probe_seed or probe set?"
    cache.layers(a)  # seed similarity compares the top layer, stage2 here: flat, no row index
    rows = seed_similarity(records, cache=cache)
    assert rows[0].layer == "stage2" and rows[0].note == ""
    monkey = RepresentationCache(AnalysisSettings())
    monkey._layers[a] = monkey._layers[b] = ["conv1", "stage1"]
    table = seed_similarity_markdown(seed_similarity(records, cache=monkey))
    assert "probes differ in rows (image, h, w): a different probe_seed or probe set?" in table
