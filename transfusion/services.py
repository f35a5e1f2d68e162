"""Local services the embedded default starts for a run: an MLflow tracking server.

The server runs as its own process group on loopback with a SQLite backend, since
several processes writing one SQLite file directly hit "database is locked"; every
job logs over HTTP instead. Artifacts are proxied by the server, so workers need no
access to its disk (or, in the cloud, to S3 credentials).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_http(url: str, *, timeout: float, process: subprocess.Popen | None = None, log_path: Path | None = None) -> None:
    """Polls ``url`` until it answers 200; fails early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"server for {url} exited with code {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_process_group(process: subprocess.Popen, *, timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


@dataclass
class MlflowServer:
    """A running ``mlflow server`` process."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        stop_process_group(self.process)


def start_mlflow_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    timeout: float = 90.0,
) -> MlflowServer:
    """Starts ``mlflow server`` (SQLite at ``home/mlflow.db``, artifacts under ``home/artifacts``)."""
    home.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = free_port(host)
    elif port_is_taken(host, port):
        raise RuntimeError(f"port {port} on {host} is already taken; choose another with --port")
    backend_uri = backend_uri or f"sqlite:///{home / 'mlflow.db'}"
    artifacts_destination = artifacts_destination or str(home / "artifacts")
    log_path = home / "logs" / f"mlflow-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts_destination,
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    url = f"http://{host}:{port}"
    try:
        wait_for_http(f"{url}/health", timeout=timeout, process=process, log_path=log_path)
    except BaseException:
        stop_process_group(process)
        raise
    log.info("MLflow server at %s (log %s)", url, log_path)
    return MlflowServer(url=url, process=process, log_path=log_path)


@contextlib.contextmanager
def tracking_service(home: Path) -> Iterator[str]:
    """Yields a tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else a server started here."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        yield configured
        return
    server = start_mlflow_server(home)
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    try:
        yield server.url
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        server.stop()
