"""The Feature reuse section from synthetic records with stored test predictions (no training)."""

from __future__ import annotations

import numpy as np

from transfusion.analysis.feature_reuse import (
    FEATURE_REUSE_TITLE,
    block_order,
    feature_reuse_markdown,
    feature_reuse_table,
)
from transfusion.analysis.plotting import panel_titles
from transfusion.analysis.records import JobRecord
from transfusion.analysis.report import analyze_records, write_report
from transfusion.analysis.transfer_effect import HELPS, NO_DIFFERENCE
from transfusion.metrics import classification_scores, save_test_predictions

N_TEST = 400
BLOCKS = ("none", "8", "1")


def _records(tmp_path) -> list[JobRecord]:
    """Transfer is a better scorer than random without shuffling and at 8 px blocks; at pixel
    shuffle it is random's scorer, seed for seed (the gap is exactly zero)."""
    y = (np.random.default_rng(7).random(N_TEST) < 0.4).astype(float)
    index = np.arange(N_TEST)
    records = []
    for block in BLOCKS:
        for seed in (0, 1, 2):
            base = np.random.default_rng([seed, int(block) if block != "none" else 0]).normal(size=N_TEST)
            better = np.random.default_rng([100, seed]).normal(size=N_TEST)
            scores = {"random": y + 1.5 * base, "imagenet": y + (1.5 * base if block == "1" else 0.4 * better)}
            for init, s in scores.items():
                path = save_test_predictions(tmp_path / f"{init}-{block}-{seed}.npz", index=index, scores=s, targets=y)
                metrics = classification_scores(s, y, ["label"]).as_metrics("test")
                records.append(JobRecord(
                    job_key=f"{init}{block}{seed}", run_id=f"{init}-{block}-{seed}", model="cbr-tiny", init=init,
                    data_size="full", seed=seed, status="FINISHED", metrics=metrics, predictions=path,
                    block_shuffle=block,
                ))  # fmt: skip
    return records


def test_gap_per_block_size_pairs_seeds_within_a_block_size(tmp_path):
    rows = feature_reuse_table(_records(tmp_path))
    assert [r.block for r in rows] == list(BLOCKS)  # none first, pixel shuffle last
    by_block = {r.block: r for r in rows}
    assert by_block["none"].gap.verdict == HELPS and by_block["8"].gap.verdict == HELPS
    # Identical scorers at pixel shuffle: paired within the block size, the gap is exactly zero.
    assert by_block["1"].gap.delta == 0 and by_block["1"].gap.verdict == NO_DIFFERENCE
    assert by_block["1"].random_aucs == by_block["1"].transfer_aucs and len(by_block["1"].seeds) == 3
    assert by_block["none"].gap.delta > 0.05 and "3 paired seeds" in by_block["none"].gap.basis
    text = feature_reuse_markdown(rows)
    assert "| cbr-tiny | full | imagenet | 1 | 3 |" in text and "+0.0 [" in text
    assert "what transfers is not (only) features" in text


def test_unshuffled_grid_has_no_feature_reuse_rows(tmp_path):
    unshuffled = [r for r in _records(tmp_path) if r.block_shuffle == "none"]
    assert feature_reuse_table(unshuffled) == []
    assert sorted(["1", "none", "56", "4", "16"], key=block_order) == ["none", "56", "16", "4", "1"]


def test_report_renders_the_section_and_keeps_block_sizes_apart_in_other_tables(tmp_path):
    outputs = analyze_records(_records(tmp_path / "runs"), tmp_path / "report", grid_name="toy",
                              dataset="synthetic-retina")  # fmt: skip
    md, html = write_report(outputs, title="toy")
    text = md.read_text()
    assert f"## {FEATURE_REUSE_TITLE}" in text and "![feature_reuse.png](feature_reuse.png)" in text
    titles = panel_titles(tmp_path / "report" / "feature_reuse.png")
    assert titles == ["cbr-tiny, full: test AUC per init (points: seeds)", "cbr-tiny, full: gap imagenet − random"]
    # The "Does transfer help?" table shows one row per block size, never an average over them.
    assert "| cbr-tiny | full | imagenet |" in text and "| cbr-tiny | full·b8 | imagenet |" in text
    assert "| cbr-tiny | full·b1 | imagenet |" in text
    assert "<h2>Feature reuse" in html.read_text()
