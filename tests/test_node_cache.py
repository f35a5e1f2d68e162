"""The data plane: publish a prepared dataset / weight file once, fetch it once per node, verified."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from transfusion.data import node_cache
from transfusion.data.node_cache import (
    dataset_for_node,
    fetch_dataset,
    fetch_weights,
    publish_dataset,
    publish_weights,
)

pytest_plugins = ("s3_server",)


def _assert_same_dataset(a, b):
    assert a.meta == b.meta
    for name in ("images", "targets", "split"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))


def test_published_dataset_is_fetched_once_per_node_and_reads_the_same(tiny_retina, tmp_path, monkeypatch):
    published = publish_dataset(tiny_retina, to=str(tmp_path / "store"))
    assert set(published.files) >= {"images.npy", "targets.npy", "split.npy", "meta.json"}
    downloads = []
    real = node_cache._download_verified
    monkeypatch.setattr(node_cache, "_download_verified", lambda *a, **k: downloads.append(a[1]) or real(*a, **k))
    cache = tmp_path / "node"
    copies = []

    def one_job():
        copies.append(fetch_dataset(published.uri, cache=cache))

    threads = [threading.Thread(target=one_job) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(copies) == 3 and len({str(c.root) for c in copies}) == 1
    assert len(downloads) == len(published.files)  # three concurrent jobs, one download
    _assert_same_dataset(copies[0], tiny_retina)
    assert not [p for p in (cache / "datasets").iterdir() if p.name.startswith(".") and p.is_dir()]
    # Publishing again uploads nothing new and names the same copy.
    assert publish_dataset(tiny_retina, to=str(tmp_path / "store")) == published


def test_a_damaged_published_file_is_refused_and_leaves_no_partial_copy(tiny_retina, tmp_path):
    published = publish_dataset(tiny_retina, to=str(tmp_path / "store"))
    images = tmp_path / "store" / "datasets" / published.key / "targets.npy"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF
    images.write_bytes(bytes(data))
    cache = tmp_path / "node"
    with pytest.raises(ValueError, match="targets.npy: downloaded .* the published copy is damaged"):
        fetch_dataset(published.uri, cache=cache)
    assert [p.name for p in (cache / "datasets").iterdir() if not p.name.endswith(".lock")] == []


def test_a_node_sharing_the_drivers_disk_reads_in_place(tiny_retina):
    assert dataset_for_node(str(tiny_retina.root), "s3://nowhere/datasets/x").root == tiny_retina.root


@pytest.mark.slow
def test_dataset_and_weights_through_the_real_s3_server(s3_server, tiny_retina, tmp_path, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.create_bucket("transfusion-data")
    published = publish_dataset(tiny_retina, to="s3://transfusion-data/plane")
    assert published.uri == f"s3://transfusion-data/plane/datasets/{published.key}"
    # A node that cannot see the driver's path fetches the published copy into its cache.
    monkeypatch.setenv("TRANSFUSION_NODE_CACHE", str(tmp_path / "node"))
    fetched = dataset_for_node(str(tmp_path / "driver-only" / "dataset"), published.uri)
    assert fetched.root == tmp_path / "node" / "datasets" / published.key
    _assert_same_dataset(fetched, tiny_retina)

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"\x00weights" * 1000)
    uri = publish_weights(weights, to="s3://transfusion-data/plane")
    assert uri.startswith("s3://transfusion-data/plane/weights/") and uri.endswith(".pt")
    local = fetch_weights(uri)
    assert local.parent == tmp_path / "node" / "weights"
    assert local.read_bytes() == weights.read_bytes()
    assert fetch_weights(uri) == local


def test_the_driver_publishes_for_workers_only_under_an_object_store_data_path(
    s3_server, tiny_retina, tmp_path, monkeypatch
):
    from transfusion.data.node_cache import for_workers, weights_for_node

    weights = tmp_path / "source.pt"
    weights.write_bytes(b"\x01source" * 500)
    monkeypatch.setenv("TRANSFUSION_DATA_PATH", str(tmp_path / "local-store"))
    assert for_workers(str(tiny_retina.root), str(weights)) == (None, str(weights))

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.create_bucket("transfusion-data")
    monkeypatch.setenv("TRANSFUSION_DATA_PATH", "s3://transfusion-data/workers")
    monkeypatch.setenv("TRANSFUSION_NODE_CACHE", str(tmp_path / "node"))
    dataset_uri, source_uri = for_workers(str(tiny_retina.root), str(weights))
    assert dataset_uri.startswith("s3://transfusion-data/workers/datasets/")
    assert source_uri.startswith("s3://transfusion-data/workers/weights/")
    assert open(weights_for_node(source_uri), "rb").read() == weights.read_bytes()
    assert weights_for_node("models:/transfusion-cbr-tiny-synthetic/1") == "models:/transfusion-cbr-tiny-synthetic/1"
    # Sources every node reaches by themselves are passed on as they are.
    assert for_workers(str(tiny_retina.root), "models:/m/1")[1] == "models:/m/1"

    # A timm source sits in the driver's hub cache, which other nodes lack: it is published,
    # as safetensors (the loader reads the format by its suffix), and loads the same there.
    from safetensors.torch import save_file

    from transfusion.pretrained import load_state_dict_from_uri

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--timm--tiny.test" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--tiny.test" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--tiny.test" / "refs" / "main").write_text("0" * 40)
    save_file({"w": torch.arange(4.0)}, snapshot / "model.safetensors")
    _, published = for_workers(str(tiny_retina.root), "timm:tiny.test")
    assert published.startswith("s3://transfusion-data/workers/weights/") and published.endswith(".safetensors")
    assert torch.equal(load_state_dict_from_uri(weights_for_node(published)).state_dict["w"], torch.arange(4.0))
