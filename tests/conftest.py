"""Shared fixtures: one real MLflow server and one local Ray per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flows.cli  # noqa: F401  (sets the same quiet environment defaults as the CLI)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    """A TRANSFUSION_HOME shared by the session (prepared datasets are cached here)."""
    home = tmp_path_factory.mktemp("transfusion-home")
    os.environ["TRANSFUSION_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def mlflow_server(session_home):
    """A real ``mlflow server`` on loopback with a SQLite store, for the whole session."""
    from flows.runtime import start_mlflow_server

    previous = os.environ.pop("MLFLOW_TRACKING_URI", None)
    server = start_mlflow_server(session_home / "tracking")
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    yield server
    server.stop()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if previous:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def ray_cluster(session_home):
    """Local Ray started in-process once (2 CPUs, like the machine)."""
    from transfusion.launcher import ensure_ray, shutdown_ray

    resources = ensure_ray(num_cpus=2)
    yield resources
    shutdown_ray()


@pytest.fixture(scope="session")
def tiny_retina(session_home):
    """A small prepared synthetic-retina set at 32 px."""
    from transfusion.data import prepare_dataset

    return prepare_dataset(
        "synthetic-retina", resolution=32, options={"train": 240, "val": 64, "test": 64}, home=session_home
    )


def run_cli(*args: str, home: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs the real ``transfusion`` command in a subprocess with its own state dir."""
    full_env = {**os.environ, "TRANSFUSION_HOME": str(home), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
