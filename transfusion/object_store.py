"""The object store (S3 or an S3-compatible server): one endpoint lookup, one client factory.

Credentials come from the standard AWS chain (environment, profile, instance role); only
the endpoint of an S3-compatible server (``AWS_ENDPOINT_URL_S3``, then
``AWS_ENDPOINT_URL``) and the region are read here, and passed on explicitly because
older boto3 and pyarrow ignore the endpoint variables.

An object store goes away for a while (a restart, a network blip): :func:`with_backoff`
is the one retry policy for its uploads and downloads.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_REGION = "us-east-1"
# How long one object-store operation keeps retrying, in seconds of waiting in total: long
# enough for a server restart, short enough that a store that is really gone fails the job.
RETRY_BUDGET_S = 60.0
# Errors whose retry cannot help (wrong keys, no bucket, no permission): fail at once.
_PERMANENT = ("ACCESS_DENIED", "AccessDenied", "NoSuchBucket", "NO_SUCH_BUCKET", "InvalidAccessKeyId",
              "SignatureDoesNotMatch", "Forbidden")  # fmt: skip


class ObjectStoreUnavailable(OSError):
    """The object store did not answer within the retry budget."""


def _transient(exc: BaseException) -> bool:
    # pyarrow reports every S3 failure as OSError with the AWS error name in the message.
    # Its subclasses (FileNotFoundError, PermissionError, ...) are answers, not an absent
    # store; so are the AWS errors that name a permanent cause.
    network = type(exc) is OSError or isinstance(exc, (ConnectionError, TimeoutError))
    return network and not any(code in str(exc) for code in _PERMANENT)


def with_backoff(
    action: Callable[[], T],
    *,
    what: str,
    budget_s: float | None = None,
    base_delay_s: float = 0.5,
    max_delay_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Runs ``action``, retrying transient object-store errors with exponential backoff and jitter.

    The n-th wait is uniform in [d/2, d] with d = min(``max_delay_s``, ``base_delay_s`` * 2**n):
    the jitter keeps many workers that lost the store together from retrying in lockstep,
    and the lower half keeps each wait from collapsing to nothing. Waiting stops once the
    next wait would pass ``budget_s`` (default :data:`RETRY_BUDGET_S`) in total; then
    :class:`ObjectStoreUnavailable` says what failed, how often and for how long. Each
    retry is logged once.
    """
    budget_s = RETRY_BUDGET_S if budget_s is None else budget_s
    rng = rng or random.Random()
    waited = 0.0
    attempt = 0
    while True:
        try:
            return action()
        except Exception as exc:
            if not _transient(exc):
                raise
            ceiling = min(max_delay_s, base_delay_s * 2**attempt)
            delay = rng.uniform(ceiling / 2, ceiling)
            if waited + delay > budget_s:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ObjectStoreUnavailable(
                    f"{what}: the object store did not answer after {attempt + 1} attempts over {waited:.0f} s"
                    f" ({reason}); check that it is up ({s3_endpoint() or 'AWS S3'}) and run again"
                ) from exc
            attempt += 1
            waited += delay
            log.warning("%s failed (%s); retry %d in %.1f s", what, type(exc).__name__, attempt, delay)
            sleep(delay)


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
