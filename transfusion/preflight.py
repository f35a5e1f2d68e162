"""Checks that services a grid needs answer, so a bad set-up fails before any run."""

from __future__ import annotations

import base64
import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlparse

from transfusion.object_store import s3_client, s3_endpoint


def mlflow_auth_headers() -> dict[str, str]:
    """HTTP basic auth from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, as MLflow's
    own client sends it; empty when they are unset (a server without its auth app)."""
    username = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not username or password is None:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def check_tracking_server(uri: str, *, timeout: float = 30.0) -> None:
    """An HTTP tracking URI must answer ``/health`` and accept this client's credentials.

    ``/health`` is open even on a server running MLflow's basic-auth app, so the
    credentials are checked with a one-row experiment search: a missing or wrong
    password fails here, before any run, instead of in every job. Other URIs are left
    to MLflow. The timeout is generous because a server on a busy machine answers its
    first search slowly; a port nobody listens on is refused at once.
    """
    if not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    headers = mlflow_auth_headers()
    path = "/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=timeout) as r:
            # MLflow answers "OK"; any other web server on that port is not a tracking server.
            if r.status != 200 or r.read(64).strip() != b"OK":
                raise RuntimeError(
                    f"MLFLOW_TRACKING_URI={uri} answers, but not as an MLflow tracking server (/health is not 'OK')"
                )
        path = "/api/2.0/mlflow/experiments/search"
        search = urllib.request.Request(f"{base}{path}?max_results=1", headers=headers)
        with urllib.request.urlopen(search, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            given = "were refused" if headers else "are not set"
            raise RuntimeError(
                f"MLflow tracking server {uri} asks for credentials (HTTP {exc.code}): "
                f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD {given}"
                " (for a stack: eval $(transfusion stack env))"
            ) from None
        if exc.code >= 500:
            raise RuntimeError(f"MLflow tracking server {uri} is not healthy (HTTP {exc.code} on {path})") from None
        raise RuntimeError(
            f"MLFLOW_TRACKING_URI={uri} answers, but not as an MLflow tracking server (HTTP {exc.code} on {path})"
        ) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"MLflow tracking server {uri} is unreachable ({reason} on {path})") from None


def check_storage_path(path: str) -> None:
    """An ``s3://bucket/...`` storage path must name an existing, reachable bucket."""
    if not path.startswith("s3://"):
        return
    bucket = urlparse(path).netloc
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        s3_client().head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise RuntimeError(
            f"no S3 credentials for storage path {path}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            " (or AWS_PROFILE)"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        # S3 and S3-compatible servers tag every answer with x-amz-* headers; a plain web
        # server's 404 would otherwise read as "no such bucket".
        if not any(name.lower().startswith("x-amz-") for name in headers):
            endpoint = s3_endpoint() or "the S3 endpoint"
            server = f", server {headers['server']!r}" if headers.get("server") else ""
            raise RuntimeError(
                f"{endpoint} (AWS_ENDPOINT_URL) answers, but not as S3 (HTTP {code or '?'}{server});"
                " point it at an S3-compatible server"
            ) from None
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise RuntimeError(f"S3 bucket {bucket!r} of storage path {path} does not exist") from None
        raise RuntimeError(f"S3 bucket {bucket!r} is not accessible ({code or exc})") from None
    except BotoCoreError as exc:
        raise RuntimeError(f"S3 endpoint for {path} is unreachable ({exc})") from None


def check_ray_address(address: str | None = None, *, timeout: float = 5.0) -> None:
    """``$RAY_ADDRESS`` (``host:port`` or ``ray://host:port``) must accept a connection.

    ``ray.init`` retries an unreachable head for minutes; a plain TCP connect answers
    in ``timeout`` seconds. ``auto``/``local`` and an unset address are left to Ray.
    """
    address = (os.environ.get("RAY_ADDRESS", "") if address is None else address).strip()
    if address in ("", "auto", "local"):
        return
    hostport = address.removeprefix("ray://").rstrip("/")
    host, sep, port_text = hostport.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"RAY_ADDRESS {address!r} is not host:port or ray://host:port (or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout) as sock:
            status = _grpc_status_line(sock, authority=hostport)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise RuntimeError(f"Ray cluster at RAY_ADDRESS={address} is unreachable ({reason})") from None
    if status != _HPACK_STATUS_200:
        raise RuntimeError(f"RAY_ADDRESS={address} answers, but not as a Ray head (no gRPC service there)")


# Ray's head (GCS) and client server speak gRPC. A port that accepts a connection but is
# not gRPC (another service, an intercepting proxy) would make ray.init retry for minutes,
# so the check asks for a gRPC method: a gRPC server answers :status 200 (the call's own
# status, e.g. unimplemented or unauthenticated, comes in trailers), anything else does not.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS, _SETTINGS = 0x1, 0x4
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
_HPACK_STATUS_200 = 0x88  # static table entry 8, ":status: 200"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(index: int, value: str) -> bytes:
    # HPACK literal without indexing, name from the static table (4-bit prefix), raw string.
    name = bytes([index]) if index < 15 else bytes([0x0F, index - 15])
    return name + bytes([len(value)]) + value.encode()


def _grpc_status_line(sock: socket.socket, *, authority: str) -> int | None:
    """The first HPACK byte of the server's response headers to an empty gRPC call."""
    headers = (
        b"\x83\x86"  # :method POST, :scheme http
        + _literal(4, "/grpc.health.v1.Health/Check")  # :path
        + _literal(1, authority)  # :authority
        + _literal(31, "application/grpc")  # content-type
        + b"\x00\x02te\x08trailers"
    )
    sock.sendall(
        _HTTP2_PREFACE + _frame(_SETTINGS, 0, 0, b"") + _frame(_HEADERS, _END_HEADERS | _END_STREAM, 1, headers)
    )
    for _ in range(16):  # SETTINGS, WINDOW_UPDATE ... come first
        head = _read_exactly(sock, 9)
        if len(head) < 9:
            return None
        size, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        payload = _read_exactly(sock, size)
        if kind == _HEADERS:
            skip = (1 if flags & _PADDED else 0) + (5 if flags & _PRIORITY else 0)
            return payload[skip] if len(payload) > skip else None
    return None


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def check_pretrained_sources(sources: list[str]) -> None:
    """Every source named in the registry, a local path or a cache/timm URI is on this machine.

    Remote URIs (``s3://``, ``models:/``, and downloads a machine with network may still
    make) are left to the resolution step; a missing local file fails here, before any
    run exists, with the registry's note on how to get it.
    """
    from urllib.parse import urlparse

    from transfusion.pretrained import missing_weights_error, resolve_uri, source_for

    for pretrained in sources:
        if pretrained in ("synthetic", "imagenet"):
            continue  # resolved per model: pretrained once, or torchvision's file
        registered = source_for(pretrained)
        uri = registered.uri if registered else pretrained
        scheme = urlparse(uri).scheme
        if len(scheme) > 1 and scheme not in ("file", "cache", "timm"):
            continue
        try:
            path = resolve_uri(uri)
        except ValueError as err:
            raise missing_weights_error(pretrained, registered, err) from None
        if scheme in ("", "file"):
            check_weights_file(path, name=pretrained)


def check_weights_file(path: str | os.PathLike[str], *, name: str) -> None:
    """A local weights file holds a state dict (tensors by name), checked without reading the tensors.

    A file given by hand may be anything with a weights name: text, an npz, a pickled list.
    Jobs would each fail on it later, on a worker, after the grid started.
    """
    from pathlib import Path

    import torch

    from transfusion.pretrained import extract_state_dict

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as weights:  # reads the header only
                weights.keys()
        except Exception as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ValueError(f"pretrained {name}: {path} is not a safetensors file ({reason})") from None
        return
    try:
        # mmap: the tensors stay on disk; only the names and structure are read.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ValueError(
                f"pretrained {name}: {path} is not a weights file torch.load(weights_only=True) reads ({reason});"
                " save one with torch.save(model.state_dict(), PATH)"
            ) from None
    try:
        extract_state_dict(obj, str(path))
    except ValueError as exc:
        raise ValueError(f"pretrained {name}: {exc}") from None
