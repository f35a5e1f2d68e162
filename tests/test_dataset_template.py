"""The dataset template: a new dataset is a declaration plus a row reader, and gets every check."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfusion.data import PrepareRequest
from transfusion.data.build import read_csv
from transfusion.data.declared import (
    DatasetDeclaration,
    DeclaredSource,
    ImageListing,
    LabelledImageSet,
    prepare_declared,
)

RES = 16


# A whole new dataset: ``scores.csv`` rows of ``file,score,split``; target: score >= threshold.
def read_score_rows(given: DeclaredSource, threshold: float) -> LabelledImageSet:
    listing, scores, split = ImageListing(given.source.root), [], []
    for line, row in read_csv(given.source.root / "scores.csv", required=("file", "score", "split")):
        listing.add(row["file"], where=f"scores.csv line {line}", column="file")
        scores.append(float(row["score"]))
        split.append(("train", "val", "test").index(row["split"]))
    return LabelledImageSet(
        targets=(np.asarray(scores, dtype=np.float32) / threshold)[:, None],  # wrong on purpose above threshold
        split=np.asarray(split, dtype=np.int8),
        label_names=["high_score"],
        task="binary",
        augment="none",
        split_rule="column 'split'",
        channels=1,
        origin="scores.csv",
        listing=listing,
    )


SCORES = DatasetDeclaration(
    recipe="1",
    options=("threshold",),
    needs="a folder holding scores.csv",
    read_options=lambda given: given.options.integer("threshold", 10, low=1),
    index=lambda given, _: {"index": given.source.fingerprint("scores.csv")},
    read_rows=read_score_rows,
)


def _scores_folder(root: Path, rows: list[tuple[str, int, str]]) -> Path:
    (root / "img").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((20, 24), 40 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
    with open(root / "scores.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("file", "score", "split"), *rows])
    return root


def _prepare(source: Path | None, home: Path, **options):
    request = PrepareRequest("scores", None if source is None else str(source), RES, tuple(sorted(options.items())))
    return prepare_declared(SCORES, request, home / "data" / "scores")


GOOD = [("img/0.png", 3, "train"), ("img/1.png", 9, "train"), ("img/2.png", 0, "val"), ("img/3.png", 5, "test")]


def test_a_declared_dataset_is_prepared_keyed_and_cached(tmp_path):
    source = _scores_folder(tmp_path / "src", GOOD)
    data = _prepare(source, tmp_path / "home")
    assert data.meta["counts"] == {"train": 2, "val": 1, "test": 1}
    assert data.meta["options"] == {"threshold": 10} and data.meta["source_identity"] == f"file:{source.resolve()}"
    np.testing.assert_allclose(data.targets[:, 0], [0.3, 0.9, 0.0, 0.5])
    assert data.images.shape == (4, RES, RES, 1) and data.images[1].mean() == pytest.approx(40, abs=1)
    assert _prepare(source, tmp_path / "home").root == data.root  # cached: same version key
    assert _prepare(source, tmp_path / "home", threshold=20).root != data.root  # options are in the key


def test_the_template_refuses_for_every_declared_dataset(tmp_path):
    home = tmp_path / "home"
    with pytest.raises(ValueError, match=r"dataset 'scores' needs a source: a folder holding scores.csv"):
        _prepare(None, home)
    with pytest.raises(ValueError, match=r"unknown option 'treshold' for dataset 'scores'; valid: skip_bad, threshold"):
        _prepare(tmp_path, home, treshold=3)
    twice = _scores_folder(tmp_path / "twice", [*GOOD, ("img/./1.png", 2, "test")])
    with pytest.raises(ValueError, match=r"scores.csv line 6: image 'img/./1.png' is listed twice \(first at .* 3\)"):
        _prepare(twice, home)
    escaping = _scores_folder(tmp_path / "escaping", [*GOOD, ("../src/img/1.png", 2, "test")])
    with pytest.raises(ValueError, match=r"line 6 column 'file': image path .* escapes the dataset root"):
        _prepare(escaping, home)
    above = _scores_folder(tmp_path / "above", [*GOOD, ("img/4.png", 12, "test")])
    with pytest.raises(ValueError, match=r"dataset 'scores' \(scores.csv\): image 4 has labels outside \[0, 1\]"):
        _prepare(above, home)
    no_val = _scores_folder(tmp_path / "no_val", [r for r in GOOD if r[2] != "val"])
    with pytest.raises(ValueError, match=r"dataset 'scores': the val split is empty"):
        _prepare(no_val, home)
    assert not (home / "data" / "scores").exists() or not any((home / "data" / "scores").iterdir())
