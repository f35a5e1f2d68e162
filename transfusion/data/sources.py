"""Where raw data comes from: a local path, or an ``s3://bucket/prefix`` copied once to a cache.

An S3 prefix is mirrored into ``$TRANSFUSION_HOME/cache/sources/<hash>/files`` next to a
``manifest.json`` that records each object's key, size, ETag and the sha256 of the bytes
we stored. Fetching the same prefix again lists it and downloads only objects whose size
or ETag changed, so a second fetch of an unchanged prefix downloads nothing. Every object
is written to a temporary file, checked (size, and MD5 where the ETag is one), and then
renamed into place, so an interrupted fetch never leaves a half-written file behind.

The boto3 client uses the usual credential chain (environment, profile, instance role)
and honours ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible servers;
credentials never appear in code, options or URIs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from transfusion.object_store import s3_client, s3_endpoint

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceObject:
    """One object of an S3 prefix, as listed and as stored in the cache."""

    path: str  # relative to the prefix, POSIX separators
    size: int
    etag: str
    sha256: str = ""


@dataclass(frozen=True)
class DataSource:
    """A source resolved to a local directory.

    Attributes:
        uri: what the caller gave (a path or ``s3://`` URI).
        root: the local directory holding the data (the cache for S3).
        identity: a string that changes whenever the data changes (part of version keys).
        file: the file name inside ``root`` when the source names a single file.
        downloaded: objects downloaded by this fetch (0 when the cache was current).
    """

    uri: str
    root: Path
    identity: str
    file: str | None = None
    downloaded: int = 0
    objects: dict[str, SourceObject] = field(default_factory=dict, compare=False, repr=False)

    def fingerprint(self, relative: str) -> str:
        """A cheap change detector for an index file (CSV, npz) of this source."""
        if relative in self.objects:
            return self.objects[relative].etag
        path = self.root / relative
        if not path.is_file():
            raise ValueError(f"{path} does not exist (source {self.uri})")
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"


def open_source(source: str | os.PathLike, *, home: Path) -> DataSource:
    """Resolves ``source`` (a local path or ``s3://bucket/prefix``) to local files.

    Args:
        source: a directory, a single file, or an S3 URI (prefix or single object).
        home: the ``$TRANSFUSION_HOME`` whose ``cache/sources`` holds S3 copies.

    Raises:
        ValueError: the path does not exist, the URI is malformed, the prefix is empty,
            or S3 refuses access (one line naming the URI).
    """
    text = str(source)
    if text.startswith("s3://"):
        return fetch_s3(text, cache_root=home / "cache" / "sources")
    if text.startswith("file://"):
        text = text[len("file://") :]
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        return DataSource(uri=str(source), root=path, identity=f"file:{path}")
    if path.is_file():
        stat = path.stat()
        return DataSource(
            uri=str(source),
            root=path.parent,
            identity=f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}",
            file=path.name,
        )
    raise ValueError(f"data source {text} does not exist")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if not match or not match.group(1):
        raise ValueError(f"malformed S3 URI {uri!r}; expected s3://bucket/prefix")
    return match.group(1), match.group(2)


def _safe_relative(key: str, prefix: str, uri: str) -> str:
    relative = key[len(prefix) :].lstrip("/")
    parts = PurePosixPath(relative).parts
    if not relative or relative.startswith("/") or ".." in parts:
        raise ValueError(f"S3 object key {key!r} under {uri} escapes the prefix; refusing to store it")
    return relative


def _list_objects(client, bucket: str, prefix: str, uri: str) -> tuple[dict[str, SourceObject], str | None]:
    """Objects under the prefix (directory semantics), or the single object named by it."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    folder = prefix.rstrip("/") + "/" if prefix else ""
    listed: dict[str, SourceObject] = {}
    single: str | None = None
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/")):
            for item in page.get("Contents", []):
                key = item["Key"]
                etag = str(item.get("ETag", "")).strip('"')
                if prefix and key == prefix.rstrip("/"):
                    single = PurePosixPath(key).name
                    listed[single] = SourceObject(single, int(item["Size"]), etag)
                elif key.startswith(folder) and not key.endswith("/"):
                    relative = _safe_relative(key, folder, uri)
                    listed[relative] = SourceObject(relative, int(item["Size"]), etag)
    except NoCredentialsError:
        raise ValueError(
            f"no AWS credentials found for {uri}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE (and AWS_ENDPOINT_URL for an S3-compatible server)"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise ValueError(f"cannot list {uri}: {code} ({exc.response.get('Error', {}).get('Message', '')})") from None
    except BotoCoreError as exc:
        raise ValueError(f"cannot list {uri}: {exc}") from None
    if single is not None:
        # A URI that names one object is that object only, not a prefix of longer keys.
        listed = {single: listed[single]}
    if not listed:
        raise ValueError(f"no objects under {uri}")
    return listed, single


def _download_object(client, bucket: str, key: str, target: Path) -> tuple[int, str, str]:
    """Streams one object into ``target``; returns (size, md5 hex, sha256 hex)."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    with open(target, "wb") as out:
        for chunk in iter(lambda: body.read(_CHUNK), b""):
            out.write(chunk)
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return size, md5.hexdigest(), sha.hexdigest()


def _fetch_one(client, bucket: str, key: str, expected: SourceObject, files: Path, uri: str) -> SourceObject:
    target = files / expected.path
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        size, md5, sha = _download_object(client, bucket, key, tmp)
        if size != expected.size:
            raise ValueError(f"s3://{bucket}/{key}: downloaded {size} bytes, listed as {expected.size}")
        # Single-part uploads have the MD5 as ETag; multipart ETags ("md5-N") are not checkable.
        if _MD5_ETAG.match(expected.etag) and md5 != expected.etag:
            raise ValueError(f"s3://{bucket}/{key}: MD5 {md5} does not match ETag {expected.etag}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return SourceObject(expected.path, size, expected.etag, sha)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock so two processes do not fetch the same prefix at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(path: Path) -> dict[str, SourceObject]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {o["path"]: SourceObject(**o) for o in data["objects"]}
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable source manifest %s", path)
        return {}


def _write_manifest(path: Path, uri: str, objects: dict[str, SourceObject]) -> None:
    payload = {
        "manifest_version": MANIFEST_VERSION,
        "uri": uri,
        "objects": [vars(objects[k]) for k in sorted(objects)],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def manifest_digest(objects: dict[str, SourceObject]) -> str:
    """A digest of (path, size, ETag) of every object: the identity of a fetched prefix."""
    lines = "\n".join(f"{k}\t{objects[k].size}\t{objects[k].etag}" for k in sorted(objects))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _unchanged_and_todo(
    listed: dict[str, SourceObject], stored: dict[str, SourceObject], files: Path
) -> tuple[dict[str, SourceObject], list[SourceObject]]:
    """(objects the mirror already holds unchanged, objects to download)."""
    current: dict[str, SourceObject] = {}
    todo: list[SourceObject] = []
    for relative, obj in listed.items():
        have = stored.get(relative)
        local = files / relative
        if (
            have is not None
            and have.size == obj.size
            and have.etag == obj.etag
            and local.is_file()
            and local.stat().st_size == obj.size
        ):
            current[relative] = have
        else:
            todo.append(obj)
    return current, todo


def _download_all(
    client, bucket: str, keys: list[str], todo: list[SourceObject], files: Path, uri: str,
    current: dict[str, SourceObject], *, workers: int,
) -> int:  # fmt: skip
    """Downloads ``todo`` concurrently, adding each completed object to ``current``;
    returns the bytes downloaded. Every failure is collected, then the first is raised."""
    downloaded_bytes = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pairs = zip(keys, todo, strict=True)
        futures = [pool.submit(_fetch_one, client, bucket, key, obj, files, uri) for key, obj in pairs]
        errors = []
        for future in futures:
            try:
                done = future.result()
            except Exception as exc:  # collect every failure, then report them together
                errors.append(exc)
                continue
            current[done.path] = done
            downloaded_bytes += done.size
    if errors:
        first = errors[0]
        if isinstance(first, ValueError):
            raise first
        raise ValueError(f"download from {uri} failed for {len(errors)} objects: {first}") from first
    return downloaded_bytes


def fetch_s3(uri: str, *, cache_root: Path, workers: int = 4) -> DataSource:
    """Mirrors ``uri`` into ``cache_root/<hash>/files``, downloading only what changed.

    Args:
        uri: ``s3://bucket/prefix`` (a folder) or ``s3://bucket/key`` (one object).
        cache_root: the directory holding one cache folder per (endpoint, URI).
        workers: concurrent downloads.

    Returns:
        A :class:`DataSource` whose ``downloaded`` counts the objects fetched this time.
    """
    bucket, prefix = parse_s3_uri(uri)
    cache = cache_root / hashlib.sha256(f"{s3_endpoint() or 'aws'}|{bucket}|{prefix}".encode()).hexdigest()[:16]
    files = cache / "files"
    manifest_path = cache / "manifest.json"
    client = s3_client()
    with _locked(cache / ".lock"):
        listed, single = _list_objects(client, bucket, prefix, uri)
        stored = _read_manifest(manifest_path)
        current, todo = _unchanged_and_todo(listed, stored, files)
        # Objects gone from the prefix leave the mirror too, so the cache equals the prefix.
        for relative in set(stored) - set(listed):
            (files / relative).unlink(missing_ok=True)
        folder = prefix.rstrip("/") + "/" if prefix else ""
        downloaded_bytes = 0
        try:
            if todo:
                files.mkdir(parents=True, exist_ok=True)
                keys = [prefix.rstrip("/") if single else folder + obj.path for obj in todo]
                downloaded_bytes = _download_all(client, bucket, keys, todo, files, uri, current, workers=workers)
        finally:
            # Record whatever completed, so a retry resumes instead of starting over.
            cache.mkdir(parents=True, exist_ok=True)
            _write_manifest(manifest_path, uri, current)
    log.info(
        "source %s: %d objects, %d downloaded (%.1f MB), %d already cached",
        uri,
        len(listed),
        len(todo),
        downloaded_bytes / 1e6,
        len(listed) - len(todo),
    )
    return DataSource(
        uri=uri,
        root=files,
        identity=f"{uri}@{manifest_digest(listed)}",
        file=single,
        downloaded=len(todo),
        objects=current,
    )
