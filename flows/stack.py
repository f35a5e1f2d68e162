"""``transfusion stack up|down|status|env``: the real services, on loopback, for one user.

Starts an S3-compatible server (SeaweedFS), an MLflow server (SQLite backend,
artifacts in S3), a Prefect server, a Ray head, a process work pool holding every
deployment of ``prefect.yaml`` and a ``prefect worker`` polling it: the shape of the
Kubernetes work pool in infra/, with flow runs as local processes instead of pods
(``--serve``: one process serving the deployments instead, no pool); records them in
``$TRANSFUSION_HOME/stack/state.json`` and writes the environment that points clients
at them to ``stack/env`` (mode 600 from its creation: it holds the generated credentials,
which never go into logs or parameters).

Every control plane asks for a credential generated at ``stack up``: MLflow runs its
basic-auth app (admin ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``), Prefect
its API auth string (``PREFECT_API_AUTH_STRING``), Ray its token (``RAY_AUTH_TOKEN``), S3 its
keys. ``stack down`` deletes them; the next ``stack up`` issues new ones (rotation).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from flows.runtime import (
    SERVICE_START_TIMEOUT_S,
    BasicCredentials,
    S3Credentials,
    ServiceProcess,
    pid_alive,
    poll_until,
    process_group_members,
    start_mlflow_server,
    start_prefect_server,
    start_ray_head,
    start_s3_server,
    start_service,
    wait_for_http,
    write_secret_file,
)
from transfusion.data import transfusion_home

ARTIFACT_BUCKET = "transfusion-artifacts"
CHECKPOINT_BUCKET = "transfusion-checkpoints"
DATA_BUCKET = "transfusion-data"
WORK_POOL = "transfusion-local"
WORKER_NAME = "transfusion-local-worker"
# "worker" and "serve" are the two ways of running deployments; a stack has one of them.
ORDER = ("s3", "mlflow", "prefect", "ray", "worker", "serve")


def stack_dir() -> Path:
    return transfusion_home() / "stack"


def _state_path() -> Path:
    return stack_dir() / "state.json"


def read_state() -> dict:
    path = _state_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def _kill_group(pid: int, timeout: float = 15.0) -> None:
    """Stops a service's whole process group (its leader may go before its children)."""

    def gone() -> bool:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return not process_group_members(pid)

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(TimeoutError):
            poll_until(gone, timeout=timeout, what=f"process group {pid}")
            return


def stack_env(state: dict) -> dict[str, str]:
    """What a client (or the served flows) needs to use the stack's services."""
    env = dict(state.get("env", {}))
    credentials = stack_dir() / "credentials.json"
    if credentials.is_file():
        stored = json.loads(credentials.read_text())
        env.update(S3Credentials(**stored["s3"]).env(state["services"]["s3"]["url"]))
        env.update(BasicCredentials(**stored["mlflow"]).mlflow_env())
        env["PREFECT_API_AUTH_STRING"] = BasicCredentials(**stored["prefect"]).auth_string
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": stored["ray_token"]})
    return env


def prefect_auth_headers(auth_string: str | None) -> dict[str, str]:
    """The header a Prefect client sends for ``PREFECT_API_AUTH_STRING`` (HTTP basic auth)."""
    if not auth_string:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def _worker_registered(api_url: str, pool: str, worker_name: str, *, auth_string: str | None = None) -> bool:
    request = urllib.request.Request(
        f"{api_url}/work_pools/{pool}/workers/filter", data=b"{}",
        headers={"Content-Type": "application/json", **prefect_auth_headers(auth_string)},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return any(w.get("name") == worker_name for w in json.load(response))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _code_root() -> str:
    """The directory holding the ``flows`` package: a checkout or site-packages alike."""
    import flows

    return str(Path(flows.__file__).resolve().parent.parent)


def _start_deployment_runner(directory: Path, run_env: dict[str, str], *, serve: bool) -> ServiceProcess:
    """``serve``: one process serving every deployment. Otherwise: deploy them to the process work
    pool (module entrypoints, so no pull step or storage: the flow-run process imports the code
    found on the worker's ``PYTHONPATH``) and start a worker polling it."""
    if serve:
        ready = directory / "serve.ready"
        ready.unlink(missing_ok=True)
        return start_service(
            "serve", [sys.executable, "-m", "flows.serve", "--ready-file", str(ready)],
            health_url=None, url="", log_dir=directory / "logs", env=run_env, ready_file=ready,
        )  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (_code_root(), os.environ.get("PYTHONPATH")) if p)
    run_env = {**run_env, "PYTHONPATH": pythonpath}
    log_dir = directory / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    deploy_log = log_dir / "deploy.log"
    with open(deploy_log, "ab") as log_file:
        deployed = subprocess.run(
            [sys.executable, "-m", "flows.serve", "--work-pool", WORK_POOL],
            env={**os.environ, **run_env}, stdout=log_file, stderr=subprocess.STDOUT, timeout=300,
        )  # fmt: skip
    if deployed.returncode != 0:
        tail = deploy_log.read_text()[-2000:]
        raise RuntimeError(f"deploying prefect.yaml to work pool {WORK_POOL} failed; see {deploy_log}\n{tail}")
    worker = start_service(
        "worker",
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process",
         "--name", WORKER_NAME],
        health_url=None, url=WORK_POOL, log_dir=log_dir,
        # Picks a queued run up within 2 s rather than the default 10.
        env={**run_env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
    )  # fmt: skip
    try:
        poll_until(
            lambda: _worker_registered(
                run_env["PREFECT_API_URL"], WORK_POOL, WORKER_NAME, auth_string=run_env.get("PREFECT_API_AUTH_STRING")
            ),
            timeout=SERVICE_START_TIMEOUT_S, what="prefect worker", process=worker.process, log_path=worker.log_path,
        )  # fmt: skip
    except BaseException:
        worker.stop()
        raise
    return worker


def stack_up(
    *, prefect_port: int, mlflow_port: int, s3_port: int, ray_port: int, num_cpus: int | None, serve: bool = False
) -> dict:
    if read_state().get("services"):
        raise RuntimeError(f"a stack is already recorded in {_state_path()}; run 'transfusion stack down' first")
    home = transfusion_home()
    directory = stack_dir()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # its logs and configs name the services; its secret files are 600 anyway
    credentials = S3Credentials.generate()
    mlflow_admin = BasicCredentials.generate()
    prefect_auth = BasicCredentials.generate()
    cred_path = directory / "credentials.json"
    # Ray >= 2.59 authenticates every client of a cluster with a token; ours is generated here.
    ray_token = secrets.token_hex(32)
    write_secret_file(cred_path, json.dumps({
        "s3": credentials.__dict__, "mlflow": mlflow_admin.__dict__, "prefect": prefect_auth.__dict__,
        "ray_token": ray_token,
    }))  # fmt: skip
    ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token}
    mlflow_auth = mlflow_admin.mlflow_env()

    started: dict[str, ServiceProcess] = {}
    try:
        started["s3"] = start_s3_server(
            directory / "s3", credentials=credentials, port=s3_port,
            buckets=(ARTIFACT_BUCKET, CHECKPOINT_BUCKET, DATA_BUCKET),
        )  # fmt: skip
        aws = credentials.env(started["s3"].url)
        os.environ.update(aws)  # for the MLflow server's artifact proxy
        mlflow = start_mlflow_server(
            directory / "mlflow", port=mlflow_port, backend_uri=f"sqlite:///{home / 'mlflow.db'}",
            artifacts_destination=f"s3://{ARTIFACT_BUCKET}/", auth=mlflow_admin,
        )  # fmt: skip
        started["mlflow"] = ServiceProcess("mlflow", mlflow.url, mlflow.process, mlflow.log_path)
        started["prefect"] = start_prefect_server(directory, port=prefect_port, auth=prefect_auth)
        # Ray's workers inherit the raylet's environment: that is how they log to MLflow. The
        # password is not sent in a job's runtime_env, which Ray stores and shows in its dashboard.
        started["ray"] = start_ray_head(
            directory, port=ray_port, num_cpus=num_cpus, env={**aws, **ray_auth, **mlflow_auth}
        )
        env = {
            "MLFLOW_TRACKING_URI": started["mlflow"].url,
            "PREFECT_API_URL": started["prefect"].url,
            "RAY_ADDRESS": started["ray"].url,
            "TRANSFUSION_HOME": str(home),
            "TRANSFUSION_STORAGE_PATH": f"s3://{CHECKPOINT_BUCKET}/ray",
        }
        run_env = {
            **aws, **ray_auth, **mlflow_auth, **env,
            "PREFECT_API_AUTH_STRING": prefect_auth.auth_string, "PREFECT_LOGGING_LEVEL": "INFO",
        }  # fmt: skip
        runner = _start_deployment_runner(directory, run_env, serve=serve)
        started[runner.name] = runner
    except BaseException:
        for name in reversed(list(started)):
            started[name].stop()
        cred_path.unlink(missing_ok=True)
        raise
    state = {
        "services": {n: {"pid": s.process.pid, "url": s.url, "log": str(s.log_path)} for n, s in started.items()},
        "env": env,
    }
    _state_path().write_text(json.dumps(state, indent=2))
    write_secret_file(directory / "env", "".join(f"export {k}={v}\n" for k, v in stack_env(state).items()))
    return state


def stack_down() -> list[str]:
    state = read_state()
    stopped = []
    for name in reversed(ORDER):
        service = state.get("services", {}).get(name)
        if service and pid_alive(service["pid"]):
            _kill_group(service["pid"])
            stopped.append(name)
    _state_path().unlink(missing_ok=True)
    (stack_dir() / "env").unlink(missing_ok=True)
    (stack_dir() / "credentials.json").unlink(missing_ok=True)
    return stopped


def stack_status() -> dict[str, str]:
    state = read_state()
    services = state.get("services", {})
    status = {}
    for name in [n for n in ORDER if n in services] if services else ORDER:
        service = services.get(name)
        if not service:
            status[name] = "not started"
            continue
        if not pid_alive(service["pid"]):
            status[name] = f"DEAD (pid {service['pid']}; log {service['log']})"
            continue
        health = {"mlflow": "/health", "prefect": "/health"}.get(name)
        if health:
            try:
                wait_for_http(service["url"] + health, timeout=3)
            except (TimeoutError, RuntimeError):
                status[name] = f"NOT ANSWERING at {service['url']} (log {service['log']})"
                continue
        status[name] = f"up {service['url']}".rstrip()
    return status


def add_stack_commands(sub: argparse._SubParsersAction) -> None:
    stack = sub.add_parser("stack", help="start/stop the real services (S3, MLflow, Prefect, Ray) on loopback")
    actions = stack.add_subparsers(dest="stack_command", required=True)
    up = actions.add_parser("up", help="start the services, a process work pool with the deployments and its worker")
    from flows.arguments import port_number, positive_int

    up.add_argument("--prefect-port", type=port_number, default=4200, help="Prefect server port (default 4200)")
    up.add_argument("--mlflow-port", type=port_number, default=5000, help="MLflow tracking server port (default 5000)")
    up.add_argument("--s3-port", type=port_number, default=8333, help="S3 (SeaweedFS) port (default 8333)")
    up.add_argument("--ray-port", type=port_number, default=6379, help="Ray head's GCS port (default 6379)")
    up.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs the Ray head offers (default: all)")
    up.add_argument(
        "--serve", action="store_true",
        help=f"serve the deployments from one process instead of the {WORK_POOL} work pool and its worker",
    )  # fmt: skip
    up.set_defaults(func=_cmd_up)
    actions.add_parser("down", help="stop everything the stack started").set_defaults(func=_cmd_down)
    actions.add_parser("status", help="health of each service").set_defaults(func=_cmd_status)
    actions.add_parser("env", help="print export lines for a shell: eval $(transfusion stack env)").set_defaults(
        func=_cmd_env
    )


def _cmd_up(args: argparse.Namespace) -> int:
    state = stack_up(
        prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, s3_port=args.s3_port,
        ray_port=args.ray_port, num_cpus=args.num_cpus, serve=args.serve,
    )  # fmt: skip
    described = {"serve": "serving prefect.yaml deployments", "worker": f"polling work pool {WORK_POOL}"}
    for name, service in state["services"].items():
        print(f"{name:8s} {described.get(name, service['url'])}  (log {service['log']})")
    print(f"\nPoint your shell at it:  eval $(transfusion stack env)\n"
          f"Then e.g.:  prefect deployment run transfusion/demo --watch\n"
          f"MLflow UI: {state['env']['MLFLOW_TRACKING_URI']}   "
          f"Prefect UI: {state['env']['PREFECT_API_URL'].removesuffix('/api')}")  # fmt: skip
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    stopped = stack_down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = stack_status()
    for name, text in status.items():
        print(f"{name:8s} {text}")
    return 0 if all(t.startswith("up") for t in status.values()) else 1


def _cmd_env(args: argparse.Namespace) -> int:
    state = read_state()
    if not state:
        raise RuntimeError("no stack is running; start one with 'transfusion stack up'")
    for key, value in stack_env(state).items():
        print(f"export {key}={value}")
    return 0
