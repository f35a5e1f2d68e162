"""The report opens with a summary generated from its own tables, and closes with the grid's config."""

from __future__ import annotations

import math

from transfusion.analysis.convergence import ConvergenceRow
from transfusion.analysis.plotting import panel_titles
from transfusion.analysis.report import APPENDIX_TITLE, SUMMARY_TITLE, AnalysisOutputs, write_report
from transfusion.analysis.similarity_figures import PairSimilarity
from transfusion.analysis.summary import plot_transfer_forest, summary_markdown, verdict_sentences
from transfusion.analysis.transfer_effect import TransferEffectRow, TransferInterval


def _row(size: str, delta: float, low: float, high: float, *, seeds: int = 3, p: float = 0.01) -> TransferEffectRow:
    auc = TransferInterval(delta, low, high, seeds, p_value=p)
    return TransferEffectRow("cbr-tiny", size, "synthetic-transfer", auc, auc, test_images=400,
                             seed_deltas=(delta - 0.01, delta, delta + 0.01)[:seeds])  # fmt: skip


def test_each_verdict_is_a_sentence_with_its_interval_in_points():
    helps, same = _row("100", 0.031, 0.012, 0.050), _row("full", -0.002, -0.011, 0.007, p=0.6)
    text = " ".join(verdict_sentences([helps, same]))
    assert "Transfer **helps** cbr-tiny at 100 images: synthetic-transfer +3.1 AUC points [+1.2, +5.0]" in text
    assert "**No detectable difference** for cbr-tiny at full data: synthetic-transfer -0.2 AUC points" in text
    assert "Holm" not in text  # p = 0.01 survives a family of 2 at alpha 0.05


def test_a_verdict_lost_to_holm_and_a_one_seed_cell_are_said_so():
    rows = [_row("100", 0.02, 0.001, 0.04, p=0.04), _row("full", 0.0, -0.01, 0.01, p=0.9),
            _row("300", 0.01, math.nan, math.nan, seeds=1, p=math.nan)]  # fmt: skip
    text = " ".join(verdict_sentences(rows))
    assert "1 of these verdict(s) do not survive a Holm correction across the table's 2 comparisons" in text
    assert "No verdict with one seed for cbr-tiny / synthetic-transfer at 300 images." in text
    assert "nan" not in text.lower()


def test_summary_names_convergence_similarity_and_what_was_run():
    conv = [ConvergenceRow("cbr-tiny", "100", "random", 0.9, 120.0, False, 3, 3),
            ConvergenceRow("cbr-tiny", "100", "synthetic-transfer", 0.9, 40.0, False, 3, 3),
            ConvergenceRow("cbr-tiny", "full", "random", 0.9, 200.0, True, 1, 3)]  # fmt: skip
    sims = [PairSimilarity("cbr-tiny", "100", "rand-rand", "svcca", 0.41, 0.02, 3, chance=0.1),
            PairSimilarity("cbr-tiny", "100", "rand-pretrained", "svcca", 0.33, 0.03, 3, chance=0.1)]  # fmt: skip
    text = summary_markdown("grid demo on synthetic-retina.", transfer_rows=[_row("100", 0.03, 0.01, 0.05)],
                            convergence_rows=conv, convergence_threshold="validation AUC 0.900",
                            similarity_rows=sims)  # fmt: skip
    assert "cbr-tiny at 100 images: synthetic-transfer 40 against random 120" in text
    assert "random–random 0.41, random–pretrained 0.33 (3 pairs, chance 0.10)" in text
    assert text.rstrip().endswith("What was run: grid demo on synthetic-retina.")
    # A cell without a transfer run says nothing about convergence rather than a one-sided number.
    assert "full data" not in text.split("Median steps")[1]


def test_forest_plot_draws_every_cell_with_a_number(tmp_path):
    rows = [_row("100", 0.03, 0.01, 0.05), _row("300", 0.01, math.nan, math.nan, seeds=1)]
    path = plot_transfer_forest(rows, tmp_path / "forest.png")
    assert path is not None and path.stat().st_size > 5000
    assert panel_titles(path) == ["Does transfer help? ΔAUC per cell"]
    nothing = TransferEffectRow("m", "full", "i", TransferInterval(math.nan, math.nan, math.nan, 0),
                                TransferInterval(math.nan, math.nan, math.nan, 0))  # fmt: skip
    assert plot_transfer_forest([nothing], tmp_path / "none.png") is None


def test_report_opens_with_the_summary_and_closes_with_the_config(tmp_path):
    outputs = AnalysisOutputs(tmp_path, sections=[(SUMMARY_TITLE, "Transfer **helps** x.", []),
                                                  ("Tables", "| a |\n|---|\n| 1 |", [])])  # fmt: skip
    md, page = write_report(outputs, title="t", notes=["a note"], config_yaml="name: demo\nseeds: [0, 1, 2]\n")
    text = md.read_text()
    assert text.index("## Summary") < text.index("> a note") < text.index("## Tables") < text.index(APPENDIX_TITLE)
    assert "```yaml\nname: demo\nseeds: [0, 1, 2]\n```" in text
    body = page.read_text()
    assert "<strong>helps</strong>" in body and "<pre>name: demo" in body


def test_report_html_links_each_cell_to_its_runs(tmp_path):
    from tasks.artifacts import linked_results_table
    from transfusion.analysis.records import JobRecord
    from transfusion.analysis.tables import results_table

    records = [JobRecord(job_key=f"k{seed}", run_id=f"run{seed}", model="cbr-tiny", init="random", data_size="full",
                         seed=seed, status="FINISHED", metrics={"test/auc": 0.8, "test/auprc": 0.7})
               for seed in (0, 1)]  # fmt: skip
    table = linked_results_table(results_table(records), records, tracking_uri="http://mlflow:5000", experiment_id="3")
    outputs = AnalysisOutputs(tmp_path, sections=[("MLflow runs of each cell", table, [])])
    _, page = write_report(outputs, title="t")
    body = page.read_text()
    for seed in (0, 1):
        url = f"http://mlflow:5000/#/experiments/3/runs/run{seed}?workflowType=machine_learning"
        assert f"<a href='{url}'>seed {seed}</a>" in body


def test_what_was_run_names_the_grid_its_axes_source_and_code():
    from tasks.analysis import what_was_run
    from transfusion.analysis.records import JobRecord
    from transfusion.config import load_grid

    grid = load_grid("demo")
    records = [JobRecord(job_key="k", run_id="r", model="cbr-tiny", init="random", data_size="full", seed=0,
                         status="FINISHED", code_version="abc123")]  # fmt: skip
    text = what_was_run(grid, records, grid.jobs())
    assert text.startswith("grid demo on synthetic-retina: cbr-tiny, cbr-small × random, synthetic-transfer, mean-var")
    assert f"1 finished runs of {len(grid.jobs())} jobs" in text and "code version abc123" in text
    assert "pretrained source synthetic (not weak by the weak_source rule)" in text
