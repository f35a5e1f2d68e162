"""The stack's control planes refuse unauthenticated callers: real servers, started by the
stack's own code (``flows.runtime``), on loopback."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.runtime import (
    BasicCredentials,
    free_port,
    mlflow_auth_config,
    start_mlflow_server,
    start_prefect_server,
    write_secret_file,
)
from flows.stack import prefect_auth_headers
from transfusion.preflight import check_tracking_server, mlflow_auth_headers


def status_of(url: str, headers: dict[str, str] | None = None, *, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------ secret files


def test_secret_file_is_private_from_its_creation(tmp_path, monkeypatch):
    """No moment with the umask's permissions: the file is created 600, not chmod-ed after."""
    path = tmp_path / "credentials.json"
    seen: list[int] = []
    real_fdopen = os.fdopen

    def spying_fdopen(fd, *args, **kwargs):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))  # before a single byte is written
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", spying_fdopen)
    old_umask = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        write_secret_file(path, "secret")
    finally:
        os.umask(old_umask)
    assert seen == [0o600]
    assert mode_of(path) == 0o600
    assert path.read_text() == "secret"


def test_secret_file_replaces_an_older_file_and_never_writes_through_a_link(tmp_path):
    path = tmp_path / "env"
    path.write_text("old")
    path.chmod(0o644)
    write_secret_file(path, "new")
    assert path.read_text() == "new" and mode_of(path) == 0o600
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    link = tmp_path / "linked"
    link.symlink_to(target)
    write_secret_file(link, "secret")
    assert target.read_text() == "untouched"
    assert not link.is_symlink() and link.read_text() == "secret"


def test_generated_credentials_are_distinct_and_usable_as_auth_strings():
    first, second = BasicCredentials.generate(), BasicCredentials.generate()
    assert first.password != second.password and len(first.password) >= 32
    assert ":" not in first.password and "%" not in first.password
    assert first.auth_string.split(":", 1) == [first.username, first.password]


def test_mlflow_auth_config_keeps_the_password_out_of_the_file(tmp_path):
    admin = BasicCredentials("admin", "s3cret-value")
    (tmp_path / "basic_auth.db").write_text("an older user store")
    env = mlflow_auth_config(tmp_path, admin=admin)
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert mode_of(config) == 0o600
    assert admin.password not in config.read_text()
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == admin.password
    assert not (tmp_path / "basic_auth.db").exists(), "an old store would keep an old admin password"


def test_mlflow_auth_headers_follow_mlflows_variables(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert mlflow_auth_headers() == {}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    assert mlflow_auth_headers() == {"Authorization": "Basic YWRtaW46cHc="}  # base64("admin:pw")


# ------------------------------------------------------------------------------ real servers


@pytest.fixture(scope="module")
def mlflow_with_auth(tmp_path_factory):
    # MLflow's auth app imports Flask-WTF (mlflow[auth], in pyproject.toml and constraints.txt).
    pytest.importorskip("flask_wtf", reason="Flask-WTF missing: pip install -c constraints.txt 'mlflow[auth]'")
    admin = BasicCredentials.generate()
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-auth"), auth=admin, tied=True)
    try:
        yield server.url, admin
    finally:
        server.stop()


def test_mlflow_refuses_unauthenticated_requests(mlflow_with_auth):
    url, admin = mlflow_with_auth
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status_of(f"{url}/health") == 200, "probes need no credentials"
    assert status_of(search) == 401
    assert status_of(search, {"Authorization": "Basic " + "d3Jvbmc6d3Jvbmc="}) == 401  # wrong:wrong
    good = {"Authorization": "Basic " + __import__("base64").b64encode(admin.auth_string.encode()).decode()}
    assert status_of(search, good) == 200


def test_mlflow_client_and_preflight_use_the_tracking_credentials(mlflow_with_auth, monkeypatch):
    url, admin = mlflow_with_auth
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD are not set"):
        check_tracking_server(url, timeout=120)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(RuntimeError, match="were refused"):
        check_tracking_server(url, timeout=120)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin.password)
    check_tracking_server(url, timeout=120)

    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(url).create_experiment("auth-smoke")
    assert MlflowClient(url).get_experiment(experiment_id).name == "auth-smoke"


@pytest.fixture(scope="module")
def prefect_with_auth(tmp_path_factory):
    auth = BasicCredentials.generate()
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-auth"), port=free_port(), auth=auth)
    try:
        yield server.url, auth
    finally:
        server.stop()


def test_prefect_refuses_unauthenticated_api_calls(prefect_with_auth):
    url, auth = prefect_with_auth
    assert status_of(f"{url}/health") == 200, "probes need no credentials"
    filter_flows = f"{url}/flows/filter"
    assert status_of(filter_flows, data=b"{}") == 401
    assert status_of(filter_flows, prefect_auth_headers("admin:wrong"), data=b"{}") == 401
    assert status_of(filter_flows, prefect_auth_headers(auth.auth_string), data=b"{}") == 200


def test_stack_env_hands_every_credential_to_clients(tmp_path, monkeypatch):
    """What `transfusion stack env` prints: each service's URL and the credential it asks for."""
    from flows.runtime import S3Credentials
    from flows.stack import stack_dir, stack_env

    monkeypatch.setenv("TRANSFUSION_HOME", str(tmp_path))
    stack_dir().mkdir(parents=True)
    mlflow, prefect = BasicCredentials.generate(), BasicCredentials.generate()
    s3 = S3Credentials.generate()
    write_secret_file(stack_dir() / "credentials.json", json.dumps({
        "s3": s3.__dict__, "mlflow": mlflow.__dict__, "prefect": prefect.__dict__, "ray_token": "t" * 64,
    }))  # fmt: skip
    state = {"services": {"s3": {"url": "http://127.0.0.1:8333"}}, "env": {"MLFLOW_TRACKING_URI": "http://x:1"}}
    env = stack_env(state)
    assert env["MLFLOW_TRACKING_URI"] == "http://x:1"
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (mlflow.username, mlflow.password)
    assert env["PREFECT_API_AUTH_STRING"] == prefect.auth_string
    assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]) == ("token", "t" * 64)
    assert env["AWS_SECRET_ACCESS_KEY"] == s3.secret_key
    assert mlflow.password != prefect.password, "one credential per service"
