"""Datasets from ``s3://`` sources served by a real S3-compatible server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_datasets import make_eyepacs, make_medmnist, read_rows

from transfusion.data import prepare_dataset, sources

# The session-scoped `s3_server` fixture (a real SeaweedFS server on loopback).
pytest_plugins = ("s3_server",)
pytestmark = pytest.mark.slow
BUCKET = "transfusion-data"


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Points the standard AWS chain at the test server, isolated from any user config."""
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def upload_tree(client, root: Path, prefix: str) -> int:
    count = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")
            count += 1
    return count


def test_eyepacs_from_s3_is_fetched_once(s3_env, tmp_path, monkeypatch):
    client = s3_env.create_bucket(BUCKET)
    local = make_eyepacs(tmp_path / "eyepacs", patients=8)
    uploaded = upload_tree(client, local, "eyepacs/v1")
    home = tmp_path / "home"
    uri = f"s3://{BUCKET}/eyepacs/v1"

    ds = prepare_dataset("retina-eyepacs", source=uri, resolution=32, home=home)
    levels = np.array([int(r["level"]) for r in read_rows(local / "trainLabels.csv")])
    np.testing.assert_array_equal(ds.grades, levels)
    np.testing.assert_array_equal(ds.targets[:, 0], levels >= 2)
    assert ds.meta["source"] == uri and ds.images.shape == (16, 32, 32, 3)

    # The cache holds every object with its size, ETag and sha256; no temporary files remain.
    (cache,) = (home / "cache" / "sources").iterdir()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["objects"]) == uploaded
    assert all(o["size"] > 0 and len(o["etag"]) == 32 and len(o["sha256"]) == 64 for o in manifest["objects"])
    assert not [p for p in (cache / "files").rglob("*.part")]

    # A second prepare lists the prefix but downloads and decodes nothing.
    def refuse(*args, **kwargs):
        raise AssertionError("downloaded an object from an unchanged prefix")

    monkeypatch.setattr(sources, "_download_object", refuse)
    again = prepare_dataset("retina-eyepacs", source=uri, resolution=32, home=home)
    assert again.root == ds.root
    fetched = sources.fetch_s3(uri, cache_root=home / "cache" / "sources")
    assert fetched.downloaded == 0
    monkeypatch.undo()
    for key, value in s3_env.env().items():
        monkeypatch.setenv(key, value)

    # Changing one object downloads just that object and makes a new version.
    rows = read_rows(local / "trainLabels.csv")
    rows[0]["level"] = "4" if rows[0]["level"] != "4" else "0"
    text = "image,level\n" + "".join(f"{r['image']},{r['level']}\n" for r in rows)
    client.put_object(Bucket=BUCKET, Key="eyepacs/v1/trainLabels.csv", Body=text.encode())
    refetched = sources.fetch_s3(uri, cache_root=home / "cache" / "sources")
    assert refetched.downloaded == 1
    changed = prepare_dataset("retina-eyepacs", source=uri, resolution=32, home=home)
    assert changed.root != ds.root and changed.grades[0] == int(rows[0]["level"])


def test_single_object_source_and_errors(s3_env, tmp_path, monkeypatch):
    client = s3_env.create_bucket(BUCKET)
    npz = make_medmnist(tmp_path / "retinamnist.npz", kind="retinamnist")
    client.upload_file(str(npz), BUCKET, "medmnist/retinamnist.npz")
    home = tmp_path / "home"
    ds = prepare_dataset("medmnist", source=f"s3://{BUCKET}/medmnist/retinamnist.npz", resolution=28, home=home)
    assert ds.meta["preset"] == "retinamnist" and ds.meta["counts"] == {
        "train": 40,
        "val": 10,
        "test": 12,
    }

    with pytest.raises(ValueError, match=r"no objects under s3://transfusion-data/nothing-here"):
        prepare_dataset("retina-eyepacs", source=f"s3://{BUCKET}/nothing-here", resolution=32, home=home)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(ValueError, match=r"^cannot list s3://transfusion-data/medmnist: SignatureDoesNotMatch"):
        prepare_dataset("retina-eyepacs", source=f"s3://{BUCKET}/medmnist", resolution=32, home=home)


def test_weights_from_s3_are_downloaded_once_into_the_cache(s3_env, tmp_path, monkeypatch):
    import hashlib

    import torch

    from transfusion.pretrained import load_state_dict_from_uri

    client = s3_env.create_bucket("weights")
    local = tmp_path / "model.pt"
    torch.save({"w": torch.arange(3.0)}, local)
    client.upload_file(str(local), "weights", "runs/7/model.pt")
    monkeypatch.setenv("TRANSFUSION_HOME", str(tmp_path / "home"))
    first = load_state_dict_from_uri("s3://weights/runs/7/model.pt")
    assert first.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    assert torch.equal(first.state_dict["w"], torch.arange(3.0))
    assert first.path.is_relative_to(tmp_path / "home" / "cache" / "weights")
    assert not list(first.path.parent.glob("*.part"))  # no partial download left beside it
    # Gone from the server, still loadable: the second load reads the cache, not S3.
    client.delete_object(Bucket="weights", Key="runs/7/model.pt")
    second = load_state_dict_from_uri("s3://weights/runs/7/model.pt")
    assert second.sha256 == first.sha256 and second.path == first.path
    with pytest.raises(ValueError, match=r"could not download s3://weights/runs/8/model.pt \(endpoint http://127"):
        load_state_dict_from_uri("s3://weights/runs/8/model.pt")
    assert not list((tmp_path / "home" / "cache" / "weights").rglob("*.part"))
