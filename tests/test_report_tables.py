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
    assert "| resnet50 | full | imagenet | 0.930 | > 20 | 0/1 reached | s0: > 20 |" in text
    # 0.92 at step 10, 0.94 at step 20: 0.93 crossed at step 15.
    assert "| resnet50 | full | random | 0.930 | 15 | 2/2 reached | s0: 15, s1: 15 |" in text
    partly = convergence_markdown(convergence_table(records + [_run("random", 2, curve=((0, 0.5),))]))
    assert "| 10 | 2/3 reached | s0: 10, s1: 10, s2: > 0 |" in partly  # the default 0.91: step 9.76


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
        assert labels == {"random", "synthetic-transfer", "mean-var@synthetic"}
        assert not any("imagenet" in train_job_task.task_run_name.format(spec=s) for s in grid.jobs())


def test_source_quality_labels_weak_by_epochs_or_top1_and_round_trips_through_tags():
    from tasks.pretraining import measured_quality, source_tags
    from transfusion.config import WeakSourceSettings
    from transfusion.pretrained import SourceQuality, published_quality, quality_label

    settings = WeakSourceSettings(min_epochs=20, min_top1=0.3)
    brief = SourceQuality("imagenet-folder", top1=0.6, top5=0.8, epochs=1.5, images_seen=4800)
    poor = SourceQuality("imagenet-folder", top1=0.05, top5=0.2, epochs=90, images_seen=10**6)
    assert quality_label(brief, min_epochs=20, min_top1=0.3) == "weak"
    assert quality_label(poor, min_epochs=20, min_top1=0.3) == "weak"
    assert quality_label(None, min_epochs=20, min_top1=0.3) == "unmeasured"
    assert SourceQuality.from_tags(brief.as_tags()) == brief
    resnet = published_quality("torchvision:resnet50/IMAGENET1K_V1")
    assert quality_label(resnet, min_epochs=20, min_top1=0.3) == "ok" and resnet.top1 == pytest.approx(0.7613)

    tags = source_tags("models:/transfusion-cbr-tiny-imagenet/1", brief, settings)
    assert tags["source.quality"] == "weak" and tags["source.top1"] == "0.6" and tags["source.epochs"] == "1.5"
    assert tags["source.description"].startswith("models:/transfusion-cbr-tiny-imagenet/1: imagenet-folder: top-1 60.0")
    assert "(weak); weak = under 20 epochs or top-1 30 %" in tags["source.description"]

    grid = load_grid({"name": "p", "dataset": "synthetic-shapes", "models": ["cbr-tiny"], "inits": ["random"],
                      "train": {"steps": 10, "batch_size": 32}})  # fmt: skip
    measured = measured_quality(grid, {"steps": 10, "test/accuracy": 0.5, "test/top5": 0.9}, train_images=640)
    assert (measured.epochs, measured.images_seen, measured.top1) == (0.5, 320, 0.5)


def test_weak_source_is_labelled_weak_in_the_report_and_loses_the_papers_imagenet_numbers(tmp_path):
    source = "models:/transfusion-resnet50-imagenet/1: imagenet-folder: top-1 2.0 %, top-5 9.0 %, 0.2 epochs (weak)"
    records = [_run("random", s) for s in (0, 1)] + [
        JobRecord(f"i{s}", f"run-i{s}", "resnet50", "imagenet", "full", s, "FINISHED",
                  metrics={"test/auc": 0.91, "test/auprc": 0.7}, source=source, source_weak=True)
        for s in (0, 1)
    ]  # fmt: skip
    outputs = analyze_records(records, tmp_path, grid_name="w", dataset="retina-eyepacs")
    text = write_report(outputs, title="w")[0].read_text()
    transfer = text[text.index("## Does transfer help?") : text.index("## Tables 1–3")]
    row = next(line for line in transfer.splitlines() if line.startswith("| resnet50 | full | imagenet† |"))
    assert f"† **weak** source: {source}" in transfer and "mean over 2 paired seeds" in transfer
    assert "paper ΔAUC" not in transfer and row.count("|") == 7  # no paper ΔAUC beside a weak source: column dropped
    tables = text[text.index("## Tables 1–3") :]
    weak_row = next(line for line in tables.splitlines() if "| imagenet (weak source) |" in line)
    assert "| 96.7 |" not in weak_row
    assert f"- imagenet: {source}" in tables


def test_imagenet_folder_recipe_is_epochs_at_the_models_standard_resolution():
    import torch

    from tasks.pretraining import imagenet_recipe
    from transfusion.train import multiclass_ce

    recipe = imagenet_recipe("cbr-small", train_images=1000)
    assert (recipe.resolution, recipe.steps, recipe.batch_size) == (224, 352, 256)  # ceil(90 x 1000 / 256)
    assert recipe.warmup_steps == 5 * 4 and recipe.eval_every == 4  # 5 warm-up epochs of 4 steps; validate per epoch
    assert recipe.optimizer == "sgd" and recipe.label_smoothing == 0.1
    assert imagenet_recipe("inception_v3", train_images=1000).resolution == 299
    assert imagenet_recipe("resnet50", train_images=1000, steps=10, workers=4, gpus_per_worker=1).steps == 10
    logits, targets = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    assert multiclass_ce(logits, targets, label_smoothing=0.1) > multiclass_ce(logits, targets)


def test_later_options_at_their_defaults_keep_grid_and_job_keys():
    from flows.cli import apply_overrides

    demo = load_grid("demo")
    data = demo.model_dump(mode="json")
    unchanged = ["train.select=last", "weak_source.min_top1=0.5", "convergence_mode=relative"]
    same = load_grid(apply_overrides(data, unchanged))
    assert same.grid_key == demo.grid_key and [j.job_key for j in same.jobs()] == [j.job_key for j in demo.jobs()]
    changed = load_grid(apply_overrides(data, ["train.select=best-val"]))
    assert changed.grid_key != demo.grid_key and changed.jobs()[0].job_key != demo.jobs()[0].job_key
