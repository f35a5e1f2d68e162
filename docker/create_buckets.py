"""Creates the S3 buckets the stack writes to, if they do not exist yet.

Run once by the compose stack's ``create-buckets`` service before MLflow and the flow
server start; safe to run again. Uses the usual AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible server).

    python create_buckets.py transfusion-artifacts transfusion-checkpoints
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

log = logging.getLogger("create_buckets")


def s3_client():
    # Older boto3 ignores AWS_ENDPOINT_URL; passing it explicitly works with every version.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def ensure_bucket(client, name: str) -> bool:
    """Creates bucket ``name`` unless it exists; returns whether it was created."""
    try:
        client.head_bucket(Bucket=name)
        return False
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
    try:
        client.create_bucket(Bucket=name)
    except ClientError as exc:
        # Another run created it between the check and the call.
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("buckets", nargs="+", help="bucket names")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the endpoint to answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    client = s3_client()
    endpoint = client.meta.endpoint_url
    deadline = time.monotonic() + args.wait_s
    while True:
        try:
            client.list_buckets()
            break
        except ClientError as exc:
            # 5xx: the server is up but not ready (SeaweedFS answers 500 until its filer
            # has joined); anything else is a refusal, which waiting does not cure.
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) < 500:
                log.error("S3 endpoint %s refused the credentials: %s", endpoint, exc)
                return 1
            reason = exc
        except (EndpointConnectionError, BotoCoreError) as exc:
            reason = exc
        if time.monotonic() > deadline:
            log.error("S3 endpoint %s was not ready within %.0f s: %s", endpoint, args.wait_s, reason)
            return 1
        time.sleep(1.0)

    for name in args.buckets:
        try:
            created = ensure_bucket(client, name)
        except (ClientError, BotoCoreError) as exc:
            log.error("could not create bucket %r: %s", name, exc)
            return 1
        log.info("bucket %s %s", name, "created" if created else "already exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
