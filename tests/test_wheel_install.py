"""A non-editable install works outside the checkout: the wheel carries prefect.yaml and runs a grid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project's wheel installed (without its dependencies, which this interpreter has) into a folder."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("transfusion-*.whl")
    target = out / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    return wheel, target


def _from_elsewhere(target, *args: str, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    """``transfusion ARGS`` from the installed copy only, run in a directory that is not the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(target), TRANSFUSION_HOME=str(cwd / "home"))
    return subprocess.run(
        [str(target / "bin" / "transfusion"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_wheel_ships_the_deployments_file(installed_wheel):
    wheel, target = installed_wheel
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("flows/prefect.yaml").decode()
    assert shipped == (REPO / "prefect.yaml").read_text()
    code = "import flows, flows.serve; print(flows.__file__, len(flows.serve.load_deployment_specs()))"
    check = subprocess.run(
        [sys.executable, "-c", code],
        cwd=target.parent,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    where, count = check.stdout.split()
    assert where.startswith(str(target)) and int(count) == shipped.count("entrypoint:")


def test_installed_cli_lists_and_runs_a_one_job_grid_from_another_directory(installed_wheel, tmp_path):
    _, target = installed_wheel
    listed = _from_elsewhere(target, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "grid presets" in listed.stdout and "demo" in listed.stdout and "cbr-tiny" in listed.stdout
    run = _from_elsewhere(target, "run", "smoke", "--set", "seeds=[0]", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    # --set seeds=[0] makes a variant of smoke, with its own name (and experiment).
    assert re.search(r"Grid smoke\+[0-9a-f]{8}: 1 trained, 0 already done, 0 failed", run.stdout), run.stdout
    assert "[1/1] cbr-tiny random 160 seed 0: test/auc" in run.stderr
    # Third-party noise stays out of the output (it shows with --verbose).
    assert "Token authentication is enabled" not in run.stderr
    assert "Waiting up to" not in run.stdout + run.stderr
    assert (tmp_path / "home" / "mlflow.db").is_file()
