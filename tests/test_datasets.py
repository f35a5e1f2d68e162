"""Real-format dataset preparers on tiny fixtures written on the fly (EyePACS, APTOS,
CheXpert, MedMNIST, generic folder), the procedural chest set, bad-data handling and
data-size subsets."""

from __future__ import annotations

import argparse
import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from transfusion.data import imaging, prepare_dataset
from transfusion.data.build import DEFAULT_RESOLUTIONS, default_resolution, split_by_strata
from transfusion.data.summary import describe

RES = 32


# ---------------------------------------------------------------- fixture writers


def fundus_bytes(seed: int, *, fmt: str = "JPEG", size: tuple[int, int] = (80, 60)) -> bytes:
    """A fundus-like photo: a coloured disc on black, wider than tall like EyePACS."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    w, h = size
    colour = tuple(int(c) for c in rng.integers([120, 40, 10], [230, 110, 60]))
    draw.ellipse([w / 2 - h / 2 + 1, 1, w / 2 + h / 2 - 1, h - 1], fill=colour)
    for _ in range(4):
        x, y = rng.integers(w / 2 - h / 4, w / 2 + h / 4), rng.integers(h / 4, 3 * h / 4)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(90, 20, 10))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def xray_bytes(seed: int, *, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size[1], size[0]), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def eyepacs_grades(patients: int) -> list[int]:
    return [(i * 7 + i // 3) % 5 for i in range(2 * patients)]


def make_eyepacs(root: Path, *, patients: int = 20, levels: list[object] | None = None) -> Path:
    """``trainLabels.csv`` + ``train/<patient>_<eye>.jpeg``, two eyes per patient."""
    levels = levels if levels is not None else eyepacs_grades(patients)
    rows = []
    for i, level in enumerate(levels):
        name = f"{10 + i // 2}_{'left' if i % 2 == 0 else 'right'}"
        rows.append([name, level])
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "train" / f"{name}.jpeg").write_bytes(fundus_bytes(i))
    write_csv(root / "trainLabels.csv", ["image", "level"], rows)
    return root


def make_aptos(root: Path, *, count: int = 30) -> Path:
    rows = []
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        code = f"{i:04x}abcd{i:02d}"
        rows.append([code, i % 5])
        (root / "train_images" / f"{code}.png").write_bytes(fundus_bytes(i, fmt="PNG", size=(64, 64)))
    write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    return root


CHEXPERT_HEADER = [
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
PATHOLOGIES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
LABEL_CYCLE = ["1.0", "0.0", "-1.0", "", "1.0", "0.0", "1.0"]


def chexpert_row(path: str, view: str, k: int) -> list[object]:
    row = {c: "" for c in CHEXPERT_HEADER}
    row.update(
        {
            "Path": path,
            "Sex": "Female",
            "Age": 50 + k % 30,
            "Frontal/Lateral": view,
            "AP/PA": "AP" if view == "Frontal" else "",
        }
    )
    for j, label in enumerate(PATHOLOGIES):
        row[label] = LABEL_CYCLE[(k + 3 * j) % len(LABEL_CYCLE)]
    return [row[c] for c in CHEXPERT_HEADER]


def make_chexpert(parent: Path, *, patients: int = 24, valid_patients: int = 6, prefix: bool = True) -> Path:
    """``CheXpert-v1.0-small/{train,valid}.csv`` and JPEGs; paths relative to the parent."""
    root = parent / "CheXpert-v1.0-small"
    lead = "CheXpert-v1.0-small/" if prefix else ""
    for split, first, count in (("train", 1, patients), ("valid", 64541, valid_patients)):
        rows, k = [], 0
        for p in range(first, first + count):
            studies = 2 if p % 3 == 0 and split == "train" else 1
            for s in range(1, studies + 1):
                views = [("view1_frontal.jpg", "Frontal")] + ([("view2_lateral.jpg", "Lateral")] if p % 2 == 0 else [])
                for file, view in views:
                    relative = f"{split}/patient{p:05d}/study{s}/{file}"
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                    (root / relative).write_bytes(xray_bytes(k + 1000 * first))
                    rows.append(chexpert_row(lead + relative, view, k))
                    k += 1
        write_csv(root / f"{split}.csv", CHEXPERT_HEADER, rows)
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def make_medmnist(path: Path, *, kind: str, sizes=(40, 10, 12), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        if kind == "retinamnist":
            arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 28, 28, 3), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 5)[:, None].astype(np.uint8)
        elif kind == "chestmnist":
            arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
            arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.3).astype(np.uint8)
        else:
            arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 3)[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="module")
def eyepacs_dir(tmp_path_factory) -> Path:
    return make_eyepacs(tmp_path_factory.mktemp("eyepacs"))


@pytest.fixture(scope="module")
def chexpert_dir(tmp_path_factory) -> Path:
    return make_chexpert(tmp_path_factory.mktemp("chexpert"))


@pytest.fixture(scope="module")
def prepared_eyepacs(eyepacs_dir, tmp_path_factory):
    return prepare_dataset("retina-eyepacs", source=str(eyepacs_dir), resolution=RES, home=tmp_path_factory.mktemp("h"))


@pytest.fixture(scope="module")
def prepared_chexpert(chexpert_dir, tmp_path_factory):
    return prepare_dataset("chexpert", source=str(chexpert_dir), resolution=RES, home=tmp_path_factory.mktemp("h"))


def leftovers(home: Path) -> list[Path]:
    """Files or version folders a failed preparation left under the data directory."""
    data = home / "data"
    return [p for p in data.rglob("*") if p.is_file() or p.parent != data] if data.exists() else []


# ---------------------------------------------------------------- retina


def test_eyepacs_labels_grades_splits_and_crop(prepared_eyepacs, eyepacs_dir):
    ds = prepared_eyepacs
    levels = np.array([int(r["level"]) for r in read_rows(eyepacs_dir / "trainLabels.csv")])
    np.testing.assert_array_equal(ds.grades, levels)
    np.testing.assert_array_equal(ds.targets[:, 0], (levels >= 2).astype(np.float32))
    assert ds.label_names == ["referable_dr"] and ds.meta["task"] == "binary" and ds.meta["augment"] == "fundus"
    assert ds.images.shape == (40, RES, RES, 3)
    assert ds.meta["counts"] == {"train": 28, "val": 4, "test": 8}
    # Both eyes of a patient stay in one split.
    groups = np.load(ds.root / "groups.npy")
    for patient in np.unique(groups):
        assert len(np.unique(ds.split[groups == patient])) == 1
    # The fundus crop centres the disc: dark corners, bright middle, though the photo was wide.
    mean = ds.images.astype(float).mean(axis=(0, 3))
    assert mean[RES // 2, RES // 2] > 60 and max(mean[0, 0], mean[0, -1], mean[-1, 0], mean[-1, -1]) < 15
    assert mean[RES // 2, 1] > 20, "the disc should reach the sides after a square crop"
    summary = ds.meta["summary"]
    assert summary["images"] == ds.meta["counts"] and ds.meta["skipped"] == 0
    assert sum(summary["positives"][s]["referable_dr"] for s in summary["images"]) == int((levels >= 2).sum())


def test_retina_split_is_stratified_by_grade(prepared_eyepacs):
    ds = prepared_eyepacs
    test = ds.grades[ds.indices("test")]
    # 8 test images over 5 grades, with patients kept together: most grades appear.
    assert len(np.unique(test)) >= 4


def test_aptos_labels(tmp_path, home):
    source = make_aptos(tmp_path / "aptos")
    ds = prepare_dataset("retina-aptos", source=str(source), resolution=RES, home=home)
    diagnosis = np.array([int(r["diagnosis"]) for r in read_rows(source / "train.csv")])
    np.testing.assert_array_equal(ds.grades, diagnosis)
    np.testing.assert_array_equal(ds.targets[:, 0], diagnosis >= 2)
    assert ds.meta["counts"] == {"train": 21, "val": 3, "test": 6}
    assert ds.images.shape == (30, RES, RES, 3)


def test_second_prepare_decodes_nothing(eyepacs_dir, home, monkeypatch):
    first = prepare_dataset("retina-eyepacs", source=str(eyepacs_dir), resolution=RES, home=home)
    mtime = (first.root / "images.npy").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("decoded an image on a cached prepare")

    monkeypatch.setattr(imaging, "load_image", refuse)
    again = prepare_dataset("retina-eyepacs", source=str(eyepacs_dir), resolution=RES, home=home)
    assert again.root == first.root and (again.root / "images.npy").stat().st_mtime_ns == mtime
    # CLI strings and typed values of the same options, and runtime-only options, are one version.
    options = {"val_fraction": "0.1", "test_fraction": 0.2, "workers": "1", "skip_bad": "false"}
    same = prepare_dataset("retina-eyepacs", source=str(eyepacs_dir), resolution=RES, options=options, home=home)
    assert same.root == first.root
    # Another resolution or option is another version.
    with pytest.raises(AssertionError, match="decoded an image"):
        prepare_dataset("retina-eyepacs", source=str(eyepacs_dir), resolution=RES + 8, home=home)
    assert not [p for p in first.root.parent.iterdir() if p.name.startswith(".")], "temporary dirs left behind"


def test_default_resolutions():
    assert default_resolution("retina-eyepacs") == 587 == DEFAULT_RESOLUTIONS["retina-aptos"]
    assert default_resolution("chexpert") == 224
    with pytest.raises(ValueError, match="no default resolution"):
        default_resolution("synthetic-shapes")


# ---------------------------------------------------------------- CheXpert


def _expected_targets(rows: list[dict[str, str]], uncertain: float) -> np.ndarray:
    mapping = {"1.0": 1.0, "0.0": 0.0, "": 0.0, "-1.0": uncertain}
    return np.array([[mapping[r[label]] for label in PATHOLOGIES] for r in rows], dtype=np.float32)


@pytest.mark.parametrize("policy, uncertain", [("u-ones", 1.0), ("u-zeros", 0.0), ("u-ignore", np.nan)])
def test_chexpert_uncertainty_policies(chexpert_dir, home, policy, uncertain):
    ds = prepare_dataset(
        "chexpert",
        source=str(chexpert_dir),
        resolution=RES,
        options={"uncertainty": policy},
        home=home,
    )
    rows = [
        r
        for r in read_rows(chexpert_dir / "train.csv") + read_rows(chexpert_dir / "valid.csv")
        if r["Frontal/Lateral"] == "Frontal"
    ]
    np.testing.assert_array_equal(ds.targets, _expected_targets(rows, uncertain))
    assert ds.label_names == PATHOLOGIES and ds.meta["uncertainty"] == policy
    if policy == "u-ignore":
        assert np.isnan(ds.targets).any() and "ignored" in ds.meta["summary"]


def test_chexpert_frontal_patients_and_test_split(prepared_chexpert, chexpert_dir, home):
    ds = prepared_chexpert
    train_rows, valid_rows = (
        read_rows(chexpert_dir / "train.csv"),
        read_rows(chexpert_dir / "valid.csv"),
    )
    frontal = [r for r in train_rows + valid_rows if r["Frontal/Lateral"] == "Frontal"]
    assert len(ds.split) == len(frontal) and ds.meta["lateral_left_out"] == len(train_rows) + len(valid_rows) - len(
        frontal
    )
    assert ds.images.shape == (len(frontal), RES, RES, 1) and ds.in_channels == 1
    assert ds.meta["augment"] == "xray" and ds.meta["task"] == "binary"
    # valid.csv is the test split; train/val split train.csv by patient.
    assert len(ds.indices("test")) == sum(r["Frontal/Lateral"] == "Frontal" for r in valid_rows)
    groups = np.load(ds.root / "groups.npy")
    by_split = {s: set(groups[ds.indices(s)]) for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert all(g.startswith("patient") for g in groups)
    # Lateral views are kept when asked.
    both = prepare_dataset(
        "chexpert",
        source=str(chexpert_dir),
        resolution=RES,
        options={"frontal_only": "false"},
        home=home,
    )
    assert len(both.split) == len(train_rows) + len(valid_rows)


def test_chexpert_root_relative_paths_and_test_fraction(tmp_path, home):
    source = make_chexpert(tmp_path, prefix=False, valid_patients=3)
    ds = prepare_dataset("chexpert", source=str(source), resolution=RES, options={"test_fraction": 0.2}, home=home)
    groups = np.load(ds.root / "groups.npy")
    assert all(g.startswith("patient000") for g in groups), "test_fraction splits train.csv, not valid.csv"
    test, train = set(groups[ds.indices("test")]), set(groups[ds.indices("train")])
    assert test and not (test & train)


# ---------------------------------------------------------------- MedMNIST, folder, synthetic chest


def test_medmnist_presets_and_generic(tmp_path, home):
    retina = prepare_dataset(
        "medmnist",
        source=str(make_medmnist(tmp_path / "retinamnist.npz", kind="retinamnist")),
        resolution=28,
        home=home,
    )
    assert retina.meta["preset"] == "retinamnist" and retina.label_names == ["referable_dr"]
    assert retina.meta["counts"] == {"train": 40, "val": 10, "test": 12} and retina.images.shape[1:] == (28, 28, 3)
    np.testing.assert_array_equal(retina.targets[:, 0], retina.grades >= 2)
    assert retina.meta["augment"] == "fundus"

    chest_file = make_medmnist(tmp_path / "c" / "chestmnist.npz", kind="chestmnist")
    chest = prepare_dataset("medmnist", source=str(chest_file.parent), resolution=RES, home=home)
    assert chest.num_labels == 14 and chest.label_names[0] == "atelectasis" and chest.images.shape[1:] == (RES, RES, 1)
    with np.load(chest_file) as npz:
        np.testing.assert_array_equal(chest.targets[:40], npz["train_labels"])

    generic = prepare_dataset(
        "medmnist",
        source=str(make_medmnist(tmp_path / "organs.npz", kind="generic")),
        resolution=28,
        home=home,
    )
    assert generic.meta["task"] == "multiclass" and generic.num_labels == 3
    np.testing.assert_array_equal(generic.targets.argmax(axis=1), generic.grades)


def test_medmnist_bad_inputs(tmp_path, home):
    path = make_medmnist(tmp_path / "retinamnist.npz", kind="retinamnist")
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["val_labels"] = arrays["val_labels"].copy()
    arrays["val_labels"][3] = 7
    bad = tmp_path / "bad" / "retinamnist.npz"
    bad.parent.mkdir()
    np.savez(bad, **arrays)
    message = r"retinamnist.npz: val_labels row 3: unknown label value 7 \(grades are 0-4\)"
    with pytest.raises(ValueError, match=message):
        prepare_dataset("medmnist", source=str(bad), resolution=28, home=home)
    del arrays["test_images"]
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="missing array 'test_images'"):
        prepare_dataset("medmnist", source=str(bad), resolution=28, home=home)
    assert not leftovers(home)


def _make_folder(root: Path, *, rows: list[list[object]] | None = None) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = []
        for i in range(30):
            (root / "imgs" / f"im{i}.png").write_bytes(fundus_bytes(i, fmt="PNG", size=(40, 40)))
            rows.append(
                [
                    f"imgs/im{i}.png",
                    i % 2,
                    (i // 2) % 2,
                    ["train", "val", "test"][min(i % 10, 2) if i % 10 < 3 else 0],
                    f"p{i // 2}",
                ]
            )
    write_csv(root / "labels.csv", ["image", "effusion", "nodule", "fold", "patient"], rows)
    return root


def test_folder_dataset_with_split_and_patient_columns(tmp_path, home):
    source = _make_folder(tmp_path / "folder")
    options = {
        "label_columns": "effusion,nodule",
        "split_column": "fold",
        "patient_column": "patient",
    }
    # Patients 0..14 hold images 2p and 2p+1, whose fold values differ for some: refused.
    with pytest.raises(ValueError, match="appears in more than one split"):
        prepare_dataset("folder", source=str(source), resolution=RES, options=options, home=home)
    options = {"label_columns": ["effusion", "nodule"], "split_column": "fold"}
    ds = prepare_dataset("folder", source=str(source), resolution=RES, options=options, home=home)
    rows = read_rows(source / "labels.csv")
    np.testing.assert_array_equal(ds.targets, [[float(r["effusion"]), float(r["nodule"])] for r in rows])
    assert ds.meta["counts"]["val"] == sum(r["fold"] == "val" for r in rows)
    split = prepare_dataset(
        "folder",
        source=str(source),
        resolution=RES,
        options={"label_columns": "effusion", "patient_column": "patient", "task": "multiclass"},
        home=home,
    )
    assert split.meta["task"] == "multiclass" and split.label_names == ["0", "1"]
    groups = np.load(split.root / "groups.npy")
    for patient in np.unique(groups):
        assert len(np.unique(split.split[groups == patient])) == 1


def test_synthetic_chest_is_deterministic_local_and_cached(home):
    from transfusion.data.synthetic_chest import generate_chest_split, render_chest

    a, la = generate_chest_split(48, 6, seed=1, split_id=0)
    b, lb = generate_chest_split(48, 6, seed=1, split_id=0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == (6, 48, 48, 1)
    healthy = render_chest(96, scene_seed=3, labels=np.zeros(5), lesion_seed=5).astype(float)
    for k in (0, 2, 3, 4):  # every finding but cardiomegaly is a small local change
        sick = render_chest(96, scene_seed=3, labels=np.eye(5)[k], lesion_seed=5).astype(float)
        changed = (np.abs(sick - healthy) > 8).mean()
        assert 0.0005 < changed < 0.03, (k, changed)
        assert abs(sick.mean() - healthy.mean()) < 1.5
    options = {"train": 24, "val": 8, "test": 8}
    ds = prepare_dataset("synthetic-chest", resolution=RES, options=options, home=home)
    assert ds.label_names == PATHOLOGIES and ds.images.shape == (40, RES, RES, 1) and ds.meta["augment"] == "xray"
    mtime = (ds.root / "images.npy").stat().st_mtime_ns
    again = prepare_dataset("synthetic-chest", resolution=RES, options=options, home=home)
    assert (again.root / "images.npy").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- bad data


def test_bad_files_are_reported_together_and_can_be_skipped(tmp_path, home):
    source = make_eyepacs(tmp_path / "eyepacs", patients=10)
    good = (source / "train" / "11_left.jpeg").read_bytes()
    (source / "train" / "11_left.jpeg").write_bytes(good[: len(good) // 2])  # truncated
    (source / "train" / "12_right.jpeg").write_bytes(b"\x00garbage" * 20)  # corrupt
    (source / "train" / "14_left.jpeg").unlink()  # missing
    with pytest.raises(ValueError) as info:
        prepare_dataset("retina-eyepacs", source=str(source), resolution=RES, home=home)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("3 bad image files") and "train/11_left.jpeg" in lines[0]
    assert any("12_right.jpeg" in line and "not a readable image" in line for line in lines[1:])
    assert any("14_left.jpeg" in line and "missing file" in line for line in lines[1:])
    assert any("11_left.jpeg" in line and "truncated" in line for line in lines[1:])
    assert not leftovers(home), "a failed preparation left files behind"

    ds = prepare_dataset("retina-eyepacs", source=str(source), resolution=RES, options={"skip_bad": True}, home=home)
    assert ds.meta["skipped"] == 3 and len(ds.split) == 17 and ds.images.shape[0] == 17
    assert sorted(f["path"] for f in ds.meta["skipped_files"]) == [
        "train/11_left.jpeg",
        "train/12_right.jpeg",
        "train/14_left.jpeg",
    ]
    levels = [int(r["level"]) for r in read_rows(source / "trainLabels.csv")]
    kept = [lv for i, lv in enumerate(levels) if i not in (2, 5, 8)]
    np.testing.assert_array_equal(ds.grades, kept)
    assert "skipped 3 bad image files" in describe(ds)
    # Without skip_bad the same inputs fail again, whatever the cache holds.
    with pytest.raises(ValueError, match="^3 bad image files"):
        prepare_dataset("retina-eyepacs", source=str(source), resolution=RES, home=home)


def test_missing_column_unknown_value_and_escaping_paths(tmp_path, home, chexpert_dir):
    source = make_eyepacs(tmp_path / "e1", patients=3)
    write_csv(source / "trainLabels.csv", ["image", "grade"], [["10_left", 1]])
    with pytest.raises(ValueError, match=r"trainLabels.csv: missing column 'level'"):
        prepare_dataset("retina-eyepacs", source=str(source), resolution=RES, home=home)

    source = make_eyepacs(tmp_path / "e2", patients=3, levels=[0, 1, 2, 7, 3, 4])
    with pytest.raises(ValueError, match=r"trainLabels.csv line 5 column 'level': unknown grade '7'"):
        prepare_dataset("retina-eyepacs", source=str(source), resolution=RES, home=home)

    broken = tmp_path / "cx" / "CheXpert-v1.0-small"
    broken.mkdir(parents=True)
    rows = read_rows(chexpert_dir / "train.csv")
    rows[4]["Edema"] = "2.0"
    write_csv(broken / "train.csv", CHEXPERT_HEADER, [[r[c] for c in CHEXPERT_HEADER] for r in rows])
    with pytest.raises(ValueError, match=r"train.csv line 6 column 'Edema': unknown label value '2.0'"):
        prepare_dataset("chexpert", source=str(broken), resolution=RES, home=home)

    for evil in ("../../etc/passwd", "/etc/passwd"):
        folder = _make_folder(tmp_path / f"f{len(evil)}", rows=[[evil, 1, 0, "train", "p0"]])
        with pytest.raises(
            ValueError,
            match=r"labels.csv line 2 column 'image': image path .* escapes the dataset root",
        ):
            prepare_dataset(
                "folder",
                source=str(folder),
                resolution=RES,
                options={"label_columns": "effusion"},
                home=home,
            )
    assert not leftovers(home)


def test_empty_split_oversized_data_size_and_unknown_option(eyepacs_dir, chexpert_dir, home, prepared_eyepacs):
    with pytest.raises(ValueError, match="the val split is empty"):
        prepare_dataset(
            "retina-eyepacs",
            source=str(eyepacs_dir),
            resolution=RES,
            options={"val_fraction": 0},
            home=home,
        )
    with pytest.raises(ValueError, match="unknown option 'uncertanity'"):
        prepare_dataset(
            "chexpert",
            source=str(chexpert_dir),
            resolution=RES,
            options={"uncertanity": "u-ones"},
            home=home,
        )
    with pytest.raises(ValueError, match="option uncertainty='u-maybe'"):
        prepare_dataset(
            "chexpert",
            source=str(chexpert_dir),
            resolution=RES,
            options={"uncertainty": "u-maybe"},
            home=home,
        )
    with pytest.raises(ValueError, match="does not exist"):
        prepare_dataset("retina-eyepacs", source=str(eyepacs_dir / "nope"), resolution=RES, home=home)
    with pytest.raises(ValueError, match="data_size 500 is larger than the 28 training images"):
        prepared_eyepacs.training_subset(500, seed=0)
    assert not leftovers(home)


# ---------------------------------------------------------------- data-size regimes


def test_subsets_nested_stratified_and_paired_on_retina(prepared_eyepacs):
    ds = prepared_eyepacs
    small, large = ds.training_subset(10, seed=0), ds.training_subset(20, seed=0)
    assert set(small) <= set(large) <= set(ds.indices("train"))
    np.testing.assert_array_equal(small, ds.training_subset(10, seed=0))  # every model/init of a seed sees these
    assert not np.array_equal(large, ds.training_subset(20, seed=1))
    pool = ds.indices("train")
    overall = np.bincount(ds.grades[pool], minlength=5) / len(pool)
    subset = np.bincount(ds.grades[large], minlength=5) / len(large)
    assert np.abs(overall - subset).max() <= 0.1


def test_subsets_nested_and_stratified_on_multilabel_chest(home, prepared_chexpert):
    ds = prepare_dataset("synthetic-chest", resolution=16, options={"train": 400, "val": 8, "test": 8}, home=home)
    sizes = (50, 100, 200)
    subsets = [ds.training_subset(n, seed=3) for n in sizes]
    assert set(subsets[0]) <= set(subsets[1]) <= set(subsets[2])
    prevalence = np.nanmean(ds.targets[ds.indices("train")], axis=0)
    for subset in subsets:
        assert np.abs(np.nanmean(ds.targets[subset], axis=0) - prevalence).max() < 0.06
    # CheXpert with u-ignore NaNs: strata treat NaN as negative; subsets still nest.
    cx = prepared_chexpert
    a, b = cx.training_subset(8, seed=0), cx.training_subset(16, seed=0)
    assert set(a) <= set(b) and len(np.unique(cx.stratum(cx.indices("train")))) > 3


def test_split_by_strata_keeps_groups_and_proportions():
    strata = np.repeat(np.arange(4), 250)
    split = split_by_strata(strata, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert np.bincount(split).tolist() == [700, 100, 200]
    for value in range(4):
        assert abs((split[strata == value] == 2).mean() - 0.2) < 0.02
    groups = np.arange(1000) // 4
    grouped = split_by_strata(strata, groups=groups, val_fraction=0.1, test_fraction=0.2, seed=0)
    for g in range(0, 250, 17):
        assert len(np.unique(grouped[groups == g])) == 1


# ---------------------------------------------------------------- summary and CLI


def test_describe_and_cli(prepared_chexpert, chexpert_dir, home, capsys, monkeypatch):
    text = describe(prepared_chexpert)
    for label in PATHOLOGIES:
        assert label in text
    assert "images" in text and "train" in text and "test" in text

    from flows.data_cli import add_data_commands

    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("TRANSFUSION_HOME", str(home))
    args = parser.parse_args(
        [
            "data",
            "prepare",
            "chexpert",
            "--source",
            str(chexpert_dir),
            "--resolution",
            str(RES),
            "--option",
            "uncertainty=u-zeros",
            "--skip-bad",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "chexpert" in out and "Pleural Effusion" in out
    bad = parser.parse_args(["data", "prepare", "chexpert", "--source", str(chexpert_dir), "--option", "oops"])
    with pytest.raises(ValueError, match="--option expects KEY=VALUE"):
        bad.func(bad)


def test_imaging_decodes_common_modes_and_crops(tmp_path):
    deep = tmp_path / "deep.png"  # 12-bit data in a 16-bit PNG, as radiographs often are
    Image.fromarray(np.linspace(0, 4095, 1600).reshape(40, 40).astype(np.uint16)).save(deep)
    grey = imaging.load_image(deep, resolution=16, channels=1, crop="center")
    assert grey.shape == (16, 16, 1) and grey.max() > 200
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (30, 20), (200, 10, 10, 128)).save(rgba)
    assert imaging.load_image(rgba, resolution=8, channels=3, crop="center").shape == (8, 8, 3)
    black = tmp_path / "black.jpeg"
    Image.new("RGB", (30, 20)).save(black)
    assert imaging.load_image(black, resolution=8, channels=3, crop="fundus").max() < 10  # no disc: centre crop
    # The fundus box is found on a subsample but lands within a few pixels of the disc.
    canvas = np.zeros((600, 900, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:600, 0:900]
    canvas[(yy - 300) ** 2 + (xx - 500) ** 2 < 280**2] = (180, 70, 20)
    left, top, right, bottom = imaging.fundus_box(canvas)
    assert abs(left - 220) <= 4 and abs(right - 780) <= 4 and top <= 24 and bottom >= 576
    with pytest.raises(ValueError, match="unknown crop"):
        imaging.load_image(black, resolution=8, channels=3, crop="circle")


def test_an_image_listed_twice_is_refused_in_every_format_naming_both_rows(tmp_path, home, chexpert_dir):
    folder = _make_folder(tmp_path / "folder")
    rows = read_rows(folder / "labels.csv")
    header = list(rows[0])
    # The same file again under another spelling, with the opposite label.
    twin = {**rows[0], "image": "imgs/./im0.png", "effusion": str(1 - int(rows[0]["effusion"]))}
    write_csv(folder / "labels.csv", header, [[r[c] for c in header] for r in [*rows, twin]])
    with pytest.raises(
        ValueError, match=r"labels.csv line 32: image 'imgs/./im0.png' is listed twice \(first at .*labels.csv line 2\)"
    ):
        prepare_dataset("folder", source=str(folder), resolution=RES, options={"label_columns": "effusion"}, home=home)

    broken = tmp_path / "cx" / "CheXpert-v1.0-small"
    shutil.copytree(chexpert_dir, broken)
    train = read_rows(chexpert_dir / "train.csv")
    write_csv(broken / "train.csv", CHEXPERT_HEADER, [[r[c] for c in CHEXPERT_HEADER] for r in [*train, train[2]]])
    message = rf"train.csv line {len(train) + 2}: image .* is listed twice \(first at .*line 4\)"
    with pytest.raises(ValueError, match=message):
        prepare_dataset("chexpert", source=str(broken), resolution=RES, options={"frontal_only": False}, home=home)
    valid = read_rows(chexpert_dir / "valid.csv")
    write_csv(broken / "train.csv", CHEXPERT_HEADER, [[r[c] for c in CHEXPERT_HEADER] for r in train])
    write_csv(broken / "valid.csv", CHEXPERT_HEADER, [[r[c] for c in CHEXPERT_HEADER] for r in [*valid, train[0]]])
    message = r"valid.csv line \d+: image .* is listed twice \(first at .*train.csv line 2\)"
    with pytest.raises(ValueError, match=message):
        prepare_dataset("chexpert", source=str(broken), resolution=RES, options={"frontal_only": False}, home=home)

    path = make_medmnist(tmp_path / "m" / "retinamnist.npz", kind="retinamnist")
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["test_images"] = arrays["test_images"].copy()
    arrays["test_images"][5] = arrays["train_images"][7]
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"test_images row 5 is the same image as train_images row 7"):
        prepare_dataset("medmnist", source=str(path), resolution=28, home=home)
    assert not leftovers(home)


def test_symlinks_resolving_outside_the_source_are_refused(tmp_path, home):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(fundus_bytes(99, fmt="PNG", size=(40, 40)))
    folder = _make_folder(tmp_path / "folder")
    (folder / "imgs" / "im3.png").unlink()
    (folder / "imgs" / "im3.png").symlink_to(outside / "secret.png")
    options = {"label_columns": "effusion"}
    message = r"labels.csv line 5 column 'image': image path 'imgs/im3.png' resolves outside the dataset root"
    with pytest.raises(ValueError, match=message):
        prepare_dataset("folder", source=str(folder), resolution=RES, options=options, home=home)
    # A symlinked folder: the path text stays inside, the files do not.
    linked = _make_folder(tmp_path / "linked")
    shutil.rmtree(linked / "imgs")
    (linked / "imgs").symlink_to(folder / "imgs", target_is_directory=True)
    with pytest.raises(ValueError, match=r"line 2 column 'image': image path 'imgs/im0.png' resolves outside"):
        prepare_dataset("folder", source=str(linked), resolution=RES, options=options, home=home)
    # A link that stays inside the source is just another path to one of its files.
    (folder / "imgs" / "im3.png").unlink()
    (folder / "imgs" / "im3.png").symlink_to(folder / "imgs" / "im4.png")
    message = r"line 6: image 'imgs/im4.png' is listed twice \(first at .*labels.csv line 5\)"
    with pytest.raises(ValueError, match=message):
        prepare_dataset("folder", source=str(folder), resolution=RES, options=options, home=home)
    assert not leftovers(home)
