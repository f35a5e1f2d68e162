"""Provenance: the code version from a git checkout, the environment report, the report's code-version notes."""

from __future__ import annotations

import csv
import importlib.metadata
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfusion.analysis.records import JobRecord
from transfusion.analysis.report import code_version_notes
from transfusion.provenance import (
    GitState,
    code_identity,
    code_matches,
    code_version,
    environment_report,
    format_code_version,
    git_state,
    package_version,
)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_state_names_the_commit_and_turns_dirty_on_a_tracked_change_only(tmp_path):
    assert git_state(tmp_path) is None  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = _git(tmp_path, "rev-parse", "--short=7", "HEAD")
    assert git_state(tmp_path) == GitState(head, dirty=False)
    (tmp_path / "notes.txt").write_text("untracked output\n")
    assert git_state(tmp_path) == GitState(head, dirty=False)
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path) == GitState(head, dirty=True)
    assert format_code_version("0.1.0", git_state(tmp_path)) == f"0.1.0+g{head}.dirty"
    assert format_code_version("0.1.0", None) == "0.1.0"


def test_this_checkout_has_a_pep440_code_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+g[0-9a-f]{7}(\.dirty)?)?", code_version()), code_version()
    assert code_version().startswith(package_version())


def test_code_identity_modes_and_which_recorded_versions_match():
    whole = "0.2.0+g1a2b3c4.dirty"
    assert code_identity("ignore", whole) is None
    assert code_identity("package", whole) == "0.2.0"
    assert code_identity("commit", whole) == whole
    with pytest.raises(ValueError, match="identity.code must be one of ignore, package, commit"):
        code_identity("latest", whole)
    assert code_matches(None, None) and code_matches("0.1.0", None)
    assert code_matches(whole, "0.2.0") and code_matches(whole, whole)
    assert not code_matches("0.2.0+g1a2b3c4", whole) and not code_matches(None, "0.2.0")
    assert not code_matches("0.1.0+g1a2b3c4", "0.2.0")


def test_environment_report_names_each_library_and_lists_installed_distributions():
    import mlflow
    import torch

    text = environment_report()
    for line in (f"code_version: {code_version()}", f"torch: {torch.__version__}", f"mlflow: {mlflow.__version__}"):
        assert line in text.splitlines()
    for label in ("python:", "CUDA (torch build):", "cuDNN:", "GPU:", "NVIDIA driver:", "ray:", "prefect:"):
        assert any(line.startswith(label) for line in text.splitlines()), label
    frozen = text.split("# installed distributions (pip freeze)\n", 1)[1].splitlines()
    assert f"torch=={importlib.metadata.version('torch')}" in frozen and len(frozen) > 20
    assert frozen == sorted(frozen, key=lambda line: line.split("==")[0].lower())


def _record(cell: tuple[str, str, str], seed: int, version: str) -> JobRecord:
    model, init, size = cell
    return JobRecord(f"{init}{seed}", f"r{seed}{init}", model, init, size, seed, "FINISHED", code_version=version)


def test_report_names_its_code_versions_and_warns_about_a_cell_that_mixes_them():
    one = [_record(("cbr-tiny", "random", "full"), s, "0.1.0+gaaaaaaa") for s in range(3)]
    assert code_version_notes(one) == ["Code version of these runs: 0.1.0+gaaaaaaa (3 runs)."]
    mixed = [
        *one[:2],
        _record(("cbr-tiny", "random", "full"), 2, "0.2.0"),
        _record(("cbr-tiny", "gabor", "full"), 0, ""),
    ]
    notes = code_version_notes(mixed)
    assert notes[0] == "Code versions of these runs: 0.1.0+gaaaaaaa (2 runs), 0.2.0 (1 run), unrecorded (1 run)."
    assert len(notes) == 2 and notes[1].startswith(
        "Warning: cell cbr-tiny / random / full mixes code versions 0.1.0+gaaaaaaa, 0.2.0"
    )
    assert code_version_notes([]) == []


def test_dataset_version_is_the_prepared_version_and_prepares_nothing(tmp_path):
    from transfusion.data import dataset_version, prepare_dataset
    from transfusion.data.synthetic import PROCEDURAL_DATASETS

    for name in sorted(PROCEDURAL_DATASETS):
        options = {"train": 12, "val": 6, "test": 6}
        found = dataset_version(name, resolution=16, options=options, home=tmp_path)
        assert not (tmp_path / "data" / name).exists(), name
        prepared = prepare_dataset(name, resolution=16, options=options, home=tmp_path)
        assert (found.version, found.train_images) == (prepared.meta["version"], len(prepared.indices("train")))

    # A source-backed set: its version from the source's identity and index, its pool once prepared.
    source = tmp_path / "folder"
    source.mkdir()
    rows = [("image", "label")]
    for i in range(20):
        Image.fromarray(np.full((12, 12, 3), 10 * i, dtype=np.uint8)).save(source / f"{i}.png")
        rows.append((f"{i}.png", str(i % 2)))
    with open(source / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    found = dataset_version("folder", source=str(source), resolution=16, home=tmp_path)
    assert found.train_images is None and not (tmp_path / "data" / "folder").exists()
    prepared = prepare_dataset("folder", source=str(source), resolution=16, home=tmp_path)
    again = dataset_version("folder", source=str(source), resolution=16, home=tmp_path)
    assert again == type(found)(prepared.meta["version"], len(prepared.indices("train")))
    with open(source / "labels.csv", "a", newline="") as handle:  # one more image under the same source
        Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(source / "20.png")
        csv.writer(handle).writerow(("20.png", "0"))
    assert dataset_version("folder", source=str(source), resolution=16, home=tmp_path).version != found.version
