"""What the report states: the convergence threshold, CheXpert's Table 2, the paper's columns, init labels."""

from __future__ import annotations

import numpy as np
import pytest

from flows.cli import build_parser, load_grid_with_overrides, threshold_overrides
from tasks.analysis import convergence_settings
from transfusion.analysis.convergence import ConvergenceSettings, convergence_markdown, convergence_table
from transfusion.analysis.records import JobRecord
from transfusion.analysis.report import analyze_records, write_report
from transfusion.analysis.tables import CHEXPERT_PATHOLOGIES, PAPER_RETINA_COLUMN, paper_tables_markdown, results_table
from transfusion.config import load_grid


def _run(init: str, seed: int, *, curve=((0, 0.5), (10, 0.92), (20, 0.94)), metrics=None) -> JobRecord:
    base = {"test/auc": 0.9 + 0.01 * seed, "test/auprc": 0.7}
    return JobRecord(f"{init}{seed}", f"run-{init}-{seed}", "resnet50", init, "full", seed, "FINISHED",
                     metrics={**base, **(metrics or {})}, val_curve=curve)  # fmt: skip


def test_threshold_defaults_to_the_papers_absolute_091():
    assert ConvergenceSettings() == ConvergenceSettings(threshold=0.91, relative=False)
    grid = load_grid("demo")
    assert convergence_settings(grid) == ConvergenceSettings(threshold=0.91, relative=False)
    with pytest.raises(ValueError, match="convergence threshold must be in"):
        ConvergenceSettings(threshold=91)


def test_figure5_presets_share_one_absolute_threshold():
    full, slim = load_grid("convergence"), load_grid("convergence-slim")
    assert convergence_settings(full) == convergence_settings(slim) == ConvergenceSettings(0.91, relative=False)


@pytest.mark.parametrize("command", ["report", "analyze"])
def test_threshold_option_reaches_the_grid_without_changing_its_key(command, tmp_path):
    extra = ["--out", str(tmp_path)] if command == "report" else []
    args = build_parser().parse_args([command, "demo", *extra, "--threshold", "0.93"])
    grid = load_grid_with_overrides(args.grid, args.set + threshold_overrides(args))
    assert convergence_settings(grid) == ConvergenceSettings(threshold=0.93, relative=False)
    # The same trained grid (its parent run) is analysed again, not a new one.
    assert grid.grid_key == load_grid("demo").grid_key
    args = build_parser().parse_args([command, "demo", *extra, "--threshold", "0.9", "--threshold-mode", "relative"])
    grid = load_grid_with_overrides(args.grid, args.set + threshold_overrides(args))
    assert convergence_settings(grid) == ConvergenceSettings(threshold=0.9, relative=True)


def test_report_states_the_threshold_and_cells_that_never_reach_it(tmp_path):
    records = [_run("random", s) for s in (0, 1)] + [_run("imagenet", 0, curve=((0, 0.5), (20, 0.92)))]
    outputs = analyze_records(records, tmp_path, grid_name="g", dataset="synthetic-retina",
                              convergence=ConvergenceSettings(threshold=0.93))  # fmt: skip
    md, _ = write_report(outputs, title="g")
    text = md.read_text()
    assert "Figure 5: convergence (threshold 0.930, absolute)" in text
    assert "Threshold: validation AUC 0.930 (absolute)." in text
    assert "| resnet50 | full | imagenet | 0.930 | never reached 0.930 | 0/1 |" in text
    assert "| resnet50 | full | random | 0.930 | 20 ± 0 | 2/2 |" in text
    partly = convergence_markdown(convergence_table(records + [_run("random", 2, curve=((0, 0.5),))]))
    assert "1 of 3 runs never reached it" in partly


def test_chexpert_report_has_per_pathology_table_with_paper_numbers(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for init in ("random", "imagenet"):
        for seed in (0, 1, 2):
            per = {f"test/{m}/{p}": 0.7 + 0.1 * rng.random() for m in ("auc", "auprc") for p in CHEXPERT_PATHOLOGIES}
            records.append(_run(init, seed, metrics=per))
    outputs = analyze_records(records, tmp_path, grid_name="chest", dataset="chexpert")
    text = write_report(outputs, title="chest")[0].read_text()
    section = text[text.index("## Table 2: CheXpert per-pathology") :]
    assert "| model | init | data size | seeds | " + " | ".join(CHEXPERT_PATHOLOGIES) + " |" in section
    assert "| resnet50 | random: paper Table 2 | full | – | 79.52 | 75.23 | 85.49 | 88.34 | 88.70 |" in section
    assert "| resnet50 | imagenet: paper Table 2 | full | – | 79.76 | 74.93 | 84.42 | 88.89 | 88.07 |" in section
    assert "same public data set" in section and "split" in section
    ours = next(line for line in section.splitlines() if line.startswith("| resnet50 | random | full | 3 |"))
    assert ours.count(" ± ") == len(CHEXPERT_PATHOLOGIES)
    assert "Test AUPRC % per pathology" in section
    # The paper's mean Table 2 difference (ImageNet - random) goes beside ours in "Does transfer help?".
    transfer = text[text.index("## Does transfer help?") : text.index("## Tables 1–3")]
    assert "| -0.2 |" in transfer  # mean over pathologies: 83.21 - 83.46


def test_retina_tables_label_the_papers_column_as_its_private_set():
    rows = results_table([_run("random", 0), _run("imagenet", 0)])
    text = paper_tables_markdown(rows, dataset="retina-eyepacs")
    assert PAPER_RETINA_COLUMN == "paper (private retina set)" and f"| {PAPER_RETINA_COLUMN} AUC % |" in text
    assert "| resnet50 | random | full | 1 | 90.0 ± – | 70.0 ± – | 96.4 |" in text
    assert "paper (private retina set)" not in paper_tables_markdown(rows, dataset="synthetic-retina")


@pytest.mark.parametrize("preset", ["demo", "convergence"])
def test_prefect_task_names_mlflow_run_names_and_report_labels_agree(preset):
    from tasks.training import train_job_task
    from transfusion.tracking import job_tags

    grid = load_grid(preset)
    for spec in grid.jobs():
        task_name = train_job_task.task_run_name.format(spec=spec)
        assert task_name == f"train-{job_tags(spec)['mlflow.runName']}"
        # collect_records labels report rows with init_label; the task name carries the same label.
        assert f"-{spec.init_label}-" in task_name
    if preset == "demo":
        labels = {spec.init_label for spec in grid.jobs()}
        assert labels == {"random", "synthetic-transfer", "mean-var"}
        assert not any("imagenet" in train_job_task.task_run_name.format(spec=s) for s in grid.jobs())
