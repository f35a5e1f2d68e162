"""The data plane: prepared datasets and weight files go to object storage once, and every
node copies them into its own local cache before its first job there.

A Ray worker on another machine cannot open a path on the driver's disk, and random
reads of a memory-mapped array over a network volume starve a GPU. So the driver
*publishes* what jobs read to a data path (``$TRANSFUSION_DATA_PATH``, default the
storage path; ``s3://bucket/prefix`` in the cloud):

- a prepared dataset under ``<data path>/datasets/<name>-<version>-r<resolution>/``:
  its files plus ``manifest.json`` (size and sha256 of each file), written last, in one
  atomic put, and only after every file was read back at its size, so a reader never
  takes a half-published dataset for a whole one (a manifest that does not parse or
  lacks a file's entry counts as none);
- a weight file under ``<data path>/weights/<sha256>.pt``: content-addressed.

A worker calls :func:`fetch_dataset` / :func:`fetch_weights`: the first job on a node
downloads into ``$TRANSFUSION_NODE_CACHE`` (default ``$TRANSFUSION_HOME/node-cache``),
hashing while it streams, under a file lock so concurrent jobs on the node wait for one
download instead of racing; the copy is renamed into place only after every checksum
matched. Later jobs on the node find it and read locally.

Every object-store call is retried with backoff while the store is away
(:func:`~transfusion.object_store.with_backoff`); past the retry budget publishing fails
with one line and no manifest.

The embedded single-machine default publishes nothing: with a local data path, driver
and workers share the disk and read the prepared dataset where it is.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from transfusion.checkpoints import storage_filesystem
from transfusion.data.prepared import PreparedDataset
from transfusion.home import storage_path, transfusion_home
from transfusion.object_store import with_backoff

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def data_path() -> str:
    """Where published datasets and weights live: ``$TRANSFUSION_DATA_PATH``, else the storage path."""
    explicit = os.environ.get("TRANSFUSION_DATA_PATH")
    if explicit:
        return explicit
    return storage_path()


def node_cache_root() -> Path:
    """This node's cache: ``$TRANSFUSION_NODE_CACHE``, else ``$TRANSFUSION_HOME/node-cache``."""
    explicit = os.environ.get("TRANSFUSION_NODE_CACHE")
    if explicit:
        return Path(explicit).resolve()
    return transfusion_home() / "node-cache"


def is_object_store(path: str) -> bool:
    return path.startswith("s3://")


@dataclass(frozen=True)
class PublishedDataset:
    """A prepared dataset in object storage: where it is and what it must hash to."""

    uri: str
    key: str
    files: dict[str, dict[str, int | str]]


def dataset_key(dataset: PreparedDataset) -> str:
    """``<name>-<version>-r<resolution>``: one published copy per prepared form."""
    version = str(dataset.meta.get("version", "unversioned"))
    return f"{dataset.name}-{version}-r{dataset.resolution}"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(filesystem: pyarrow.fs.FileSystem, path: str) -> dict | None:
    def read() -> bytes | None:
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with filesystem.open_input_stream(path) as stream:
            return stream.read()

    raw = with_backoff(read, what=f"read {path}")
    return None if raw is None else json.loads(raw.decode())


def _read_manifest(filesystem: pyarrow.fs.FileSystem, path: str) -> dict | None:
    """The manifest at ``path`` when it is complete (parses, lists files with size and sha256), else None."""
    try:
        manifest = _read_json(filesystem, path)
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s does not parse: treated as no manifest", path)
        return None
    if manifest is None:
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or not files
        or not all(isinstance(entry, dict) and {"size", "sha256"} <= entry.keys() for entry in files.values())
    ):
        log.warning("%s is incomplete (no size and sha256 for every file): treated as no manifest", path)
        return None
    return manifest


def _upload(filesystem: pyarrow.fs.FileSystem, local: Path, remote: str, *, size: int) -> None:
    """Uploads ``local`` and checks that the store holds ``size`` bytes under ``remote``."""

    def put() -> None:
        with local.open("rb") as source, filesystem.open_output_stream(remote) as sink:
            while chunk := source.read(_CHUNK):
                sink.write(chunk)

    with_backoff(put, what=f"upload {remote}")
    stored = with_backoff(lambda: filesystem.get_file_info(remote), what=f"check {remote}")
    if stored.type != pyarrow.fs.FileType.File or stored.size != size:
        raise OSError(f"{remote}: the store holds {stored.size} bytes after the upload, expected {size}; run again")


def _write_whole(filesystem: pyarrow.fs.FileSystem, remote: str, data: bytes) -> None:
    """Writes ``data`` so that a reader sees all of it or nothing: one put on S3, a rename on disk."""
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        partial = f"{remote}.partial-{os.getpid()}"
        with filesystem.open_output_stream(partial) as stream:
            stream.write(data)
        os.replace(partial, remote)
        return

    def put() -> None:
        with filesystem.open_output_stream(remote) as stream:
            stream.write(data)

    with_backoff(put, what=f"write {remote}")


def publish_dataset(dataset: PreparedDataset, *, to: str | None = None) -> PublishedDataset:
    """Uploads ``dataset`` to ``<to>/datasets/<key>/`` unless a complete copy is there already.

    The manifest goes up last: its presence is what marks a published copy complete.
    """
    base = to or data_path()
    key = dataset_key(dataset)
    filesystem, root = storage_filesystem(base)
    folder = f"{root.rstrip('/')}/datasets/{key}"
    uri = f"{base.rstrip('/')}/datasets/{key}"
    existing = _read_manifest(filesystem, f"{folder}/{MANIFEST}")
    if existing is not None and existing.get("meta", {}).get("version") == dataset.meta.get("version"):
        return PublishedDataset(uri=uri, key=key, files=existing["files"])
    files = {
        path.name: {"size": path.stat().st_size, "sha256": _sha256_of(path)}
        for path in sorted(Path(dataset.root).iterdir())
        if path.is_file()
    }
    with_backoff(lambda: filesystem.create_dir(folder, recursive=True), what=f"create {uri}")
    for name, entry in files.items():
        _upload(filesystem, Path(dataset.root) / name, f"{folder}/{name}", size=int(entry["size"]))
    manifest = {"key": key, "meta": dataset.meta, "files": files}
    _write_whole(filesystem, f"{folder}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
    log.info("published dataset %s to %s (%d files)", key, uri, len(files))
    return PublishedDataset(uri=uri, key=key, files=files)


@contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process of this node (not across nodes: each has its own cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_verified(filesystem: pyarrow.fs.FileSystem, remote: str, local: Path, *, size: int, sha256: str) -> None:
    digest = hashlib.sha256()
    written = 0
    with filesystem.open_input_stream(remote) as source, local.open("wb") as sink:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            sink.write(chunk)
            written += len(chunk)
    if written != size or digest.hexdigest() != sha256:
        raise ValueError(
            f"{remote}: downloaded {written} bytes with sha256 {digest.hexdigest()[:12]}..., expected {size} bytes"
            f" with {sha256[:12]}...; the published copy is damaged: delete it and run again to republish"
        )


def fetch_dataset(uri: str, *, cache: Path | None = None) -> PreparedDataset:
    """This node's verified copy of the dataset published at ``uri``, downloading it once per node."""
    cache = cache or node_cache_root()
    key = uri.rstrip("/").rsplit("/", 1)[-1]
    target = cache / "datasets" / key
    if (target / MANIFEST).is_file():
        return PreparedDataset.open(target)
    filesystem, folder = storage_filesystem(uri)
    with _node_lock(cache / "datasets" / f".{key}.lock"):
        if (target / MANIFEST).is_file():  # another job on this node fetched it while we waited
            return PreparedDataset.open(target)
        manifest = _read_manifest(filesystem, f"{folder.rstrip('/')}/{MANIFEST}")
        if manifest is None:
            raise ValueError(
                f"no published dataset at {uri} (no complete {MANIFEST}); publish it from the driver first"
            )
        partial = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
        try:
            for name, entry in manifest["files"].items():
                remote = f"{folder.rstrip('/')}/{name}"
                with_backoff(lambda remote=remote, name=name, entry=entry: _download_verified(
                    filesystem, remote, partial / name, size=int(entry["size"]), sha256=str(entry["sha256"]),
                ), what=f"download {remote}")  # fmt: skip
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    log.info("fetched dataset %s into %s", key, target)
    return PreparedDataset.open(target)


def publish_weights(path: Path, *, to: str | None = None) -> str:
    """Uploads a weight file under its sha256 (once) and returns its URI."""
    base = to or data_path()
    sha256 = _sha256_of(Path(path))
    # The loader reads safetensors by its suffix; everything else is a torch file.
    suffix = ".safetensors" if Path(path).suffix == ".safetensors" else ".pt"
    filesystem, root = storage_filesystem(base)
    remote = f"{root.rstrip('/')}/weights/{sha256}{suffix}"
    if with_backoff(lambda: filesystem.get_file_info(remote), what=f"check {remote}").type != pyarrow.fs.FileType.File:
        with_backoff(lambda: filesystem.create_dir(f"{root.rstrip('/')}/weights", recursive=True),
                     what=f"create {base}/weights")  # fmt: skip
        _upload(filesystem, Path(path), remote, size=Path(path).stat().st_size)
    return f"{base.rstrip('/')}/weights/{sha256}{suffix}"


def fetch_weights(uri: str, *, cache: Path | None = None) -> Path:
    """This node's verified copy of a weight file published by :func:`publish_weights`."""
    cache = cache or node_cache_root()
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    sha256 = name.removesuffix(".pt").removesuffix(".safetensors")
    target = cache / "weights" / name
    if target.is_file():
        return target
    filesystem, remote = storage_filesystem(uri)
    with _node_lock(cache / "weights" / f".{name}.lock"):
        if target.is_file():
            return target
        size = filesystem.get_file_info(remote).size
        if size is None:
            raise ValueError(f"no published weights at {uri}")
        partial = target.with_name(f".{name}.partial-{os.getpid()}")
        try:
            _download_verified(filesystem, remote, partial, size=int(size), sha256=sha256)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


_PUBLISHED_WEIGHTS = re.compile(r"/weights/[0-9a-f]{64}\.(pt|safetensors)$")


def weights_for_node(uri: str) -> str:
    """Where a job on this node loads ``uri`` from: its node-cache copy when ``uri`` was
    published by :func:`publish_weights`, else ``uri`` itself (``models:/``, ``s3://`` and
    hub sources are reachable from any node)."""
    if is_object_store(uri) and _PUBLISHED_WEIGHTS.search(uri):
        return str(fetch_weights(uri))
    return uri


def for_workers(dataset_root: str, source_uri: str | None) -> tuple[str | None, str | None]:
    """(published dataset URI, source URI workers can reach) for a cluster whose nodes may
    share no disk with the driver: published under an object-store data path, else
    nothing (the disk is shared) and ``source_uri`` as it is.

    Publishing is idempotent (the manifest is checked first); the driver's local weight
    files (a path, a hub-cache file) are published under their sha256.
    """
    base = data_path()
    if not is_object_store(base):
        return None, source_uri
    # Jobs of a grid ask concurrently; one of them publishes (hashing gigabytes once).
    with _PUBLISH_LOCK:
        key = (dataset_root, base)
        if key not in _PUBLISHED:
            _PUBLISHED[key] = publish_dataset(PreparedDataset.open(dataset_root), to=base).uri
        local = _driver_file(source_uri) if source_uri else None
        if local is not None:
            source_key = (source_uri, base)
            if source_key not in _PUBLISHED:
                _PUBLISHED[source_key] = publish_weights(local, to=base)
            source_uri = _PUBLISHED[source_key]
        return _PUBLISHED[key], source_uri


_PUBLISH_LOCK = threading.Lock()
_PUBLISHED: dict[tuple[str, str], str] = {}


def _is_local_file(uri: str) -> bool:
    scheme = uri.split(":", 1)[0] if "://" in uri or uri.startswith("file:") else ""
    return scheme in ("", "file") and Path(uri.removeprefix("file://")).is_file()


# Sources whose file sits in a cache on the driver (a timm hub cache, a file placed by
# hand, a download): other nodes have their own, maybe empty, caches.
_DRIVER_CACHE_SCHEMES = ("timm:", "cache:", "https:")


def _driver_file(uri: str) -> Path | None:
    """The driver's local file of ``uri`` when workers elsewhere could not read it, else None."""
    if _is_local_file(uri):
        return Path(uri.removeprefix("file://"))
    if uri.startswith(_DRIVER_CACHE_SCHEMES):
        from transfusion.pretrained import resolve_uri

        return resolve_uri(uri)
    return None


def dataset_for_node(driver_root: str, published_uri: str | None) -> PreparedDataset:
    """The dataset a job on this node reads: the driver's copy when this node shares its
    disk (same version there), else this node's cached copy of the published one."""
    root = Path(driver_root)
    if (root / "meta.json").is_file() or published_uri is None:
        return PreparedDataset.open(root)
    return fetch_dataset(published_uri)
