"""The object store (S3 or an S3-compatible server): one endpoint lookup, one client factory.

Credentials come from the standard AWS chain (environment, profile, instance role); only
the endpoint of an S3-compatible server (``AWS_ENDPOINT_URL_S3``, then
``AWS_ENDPOINT_URL``) and the region are read here, and passed on explicitly because
older boto3 and pyarrow ignore the endpoint variables.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

DEFAULT_REGION = "us-east-1"


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint URL from the environment; None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or DEFAULT_REGION


def s3_client(
    *,
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
) -> Any:
    """A boto3 S3 client: the given endpoint and keys, else the environment's.

    A fresh session per client: boto3's default session caches the credentials it
    resolved first, so later changes to the environment or profile would be ignored.
    """
    import boto3

    session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    return session.client("s3", endpoint_url=endpoint_url or s3_endpoint(), region_name=region or s3_region())


def s3_filesystem() -> Any:
    """A pyarrow S3 filesystem for the environment's endpoint and region."""
    import pyarrow.fs

    options: dict[str, Any] = {"region": s3_region()}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pyarrow.fs.S3FileSystem(**options)
