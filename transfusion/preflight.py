"""Checks that services a grid needs answer, so a bad set-up fails before any run."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlparse

from transfusion.object_store import s3_client


def check_tracking_server(uri: str, *, timeout: float = 5.0) -> None:
    """An HTTP tracking URI must answer ``/health``; other URIs are left to MLflow."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"MLflow tracking server {uri} is unreachable ({reason})") from None
    raise RuntimeError(f"MLflow tracking server {uri} is not healthy")


def check_storage_path(path: str) -> None:
    """An ``s3://bucket/...`` storage path must name an existing, reachable bucket."""
    if not path.startswith("s3://"):
        return
    bucket = urlparse(path).netloc
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
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
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise RuntimeError(f"Ray cluster at RAY_ADDRESS={address} is unreachable ({reason})") from None
