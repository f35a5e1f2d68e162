"""Shared fixtures: one real MLflow server and one local Ray per test session."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flows.cli  # noqa: F401  (sets the same quiet environment defaults as the CLI)
from tests.shared_prefect import shared_prefect_api_url, stop_shared_prefect

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(trylast=True)  # after the tmp_path plugin has set up its factory
def pytest_configure(config):
    """Prefect's temporary servers (flows run here and by the ``transfusion`` commands tests
    start) keep their SQLite database in PREFECT_HOME: one per test process, so that parallel
    workers, and other test sessions on the machine, never write to the same ``~/.prefect``."""
    factory = getattr(config, "_tmp_path_factory", None)
    # Not in an xdist controller: it runs no test, and its environment is its workers', whose
    # processes must not name its basetemp (the session-end check would count them).
    controller = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
    if factory is not None and not controller:
        home = factory.getbasetemp() / "prefect-home"
        home.mkdir(exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)


def command_env(home: Path, env: dict | None = None) -> dict[str, str]:
    """The environment of a ``transfusion`` command a test starts: its own state dir, its
    own MLflow server (none given), this process's shared Prefect server, then ``env``
    (a value of None removes that variable: ``PREFECT_API_URL: None`` gives the command a
    temporary Prefect server of its own)."""
    full_env = {**os.environ, "TRANSFUSION_HOME": str(home)}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env["PREFECT_API_URL"] = shared_prefect_api_url()
    full_env.update(env or {})
    return {key: value for key, value in full_env.items() if value is not None}


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


def run_cli(*args: str, home: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs the real ``transfusion`` command in a subprocess with its own state dir.

    Past ``timeout`` the command is interrupted the way a user would (SIGINT, so it stops
    the servers it started), then killed with its process group, and the test fails with
    the end of what it printed: where a slow or stuck command was is at the end.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=command_env(home, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _interrupt_then_kill_group(process)
        pytest.fail(
            f"transfusion {' '.join(args)} still running after {timeout:g} s; the end of its output:\n"
            f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-6000:]}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _interrupt_then_kill_group(process: subprocess.Popen, grace: float = 60) -> tuple[str, str]:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        return process.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()


def pytest_collection_modifyitems(session, config, items):
    """Modules with end-to-end (``slow``) tests run first, each module's tests in their own order.

    Under pytest-xdist (``--dist loadfile``) a module is one unit of work handed to a free
    worker in this order: starting the long ones first keeps one of them from being the
    last thing a run waits for.
    """
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)  # stable: keeps the order within


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_mentioning(text: str) -> list[str]:
    """Live processes (other than this one) whose command line or environment names ``text``,
    as ``pid: command``; a server a test started carries its TRANSFUSION_HOME in one of them."""
    found = []
    needle = text.encode()
    ours = _ancestors()  # pytest and whatever started it (its command line may name the temp folder)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in ours:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie runs nothing
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{proc.name}: {command}")
    return found


# Under pytest-xdist each worker checks its own processes (their command line or environment
# names the worker's basetemp, <root>/popen-gwN) and hands what it found to the controller:
# a worker's exit status is sent before its sessionfinish hooks run, so only the controller
# can fail the run. The controller also checks the root, which covers every worker.
_WORKER_LEAKS = pytest.StashKey[list[str]]()


def stop_leaked_processes(basetemp: Path) -> list[str]:
    """Processes that name ``basetemp`` and outlived the session, as ``pid: command``; each is
    SIGKILLed (the leak must not outlive CI either) after a short grace period."""
    # With the separator: pytest-1 must not match another session's pytest-12.
    inside = str(basetemp) + os.sep
    deadline = time.monotonic() + 10  # a server stopped just now may take a moment to go
    leaked = processes_mentioning(inside)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.5)
        leaked = processes_mentioning(inside)
    for line in leaked:
        with contextlib.suppress(OSError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    return leaked


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: collects what a worker's session-end check found."""
    leaked = getattr(node, "workeroutput", {}).get("leaked_processes") or []
    if leaked:
        worker = node.gateway.id
        node.config.stash.setdefault(_WORKER_LEAKS, []).extend(f"{line}  (worker {worker})" for line in leaked)


def pytest_sessionfinish(session, exitstatus):
    """Fails the run if a process a test started (it names pytest's temp folder) outlived the session."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None) if factory else None
    leaked = list(session.config.stash.get(_WORKER_LEAKS, []))
    if basetemp is not None:
        stop_shared_prefect()  # the commands' server: it names the basetemp too
        # Flows run in this process started Prefect's temporary server; Prefect stops it at exit,
        # after this check, so it is stopped here (it would otherwise count as a leak).
        prefect_server = sys.modules.get("prefect.server.api.server")
        if prefect_server is not None:
            for server in list(prefect_server.SubprocessASGIServer._instances.values()):
                with contextlib.suppress(Exception):
                    server.stop()
        leaked += stop_leaked_processes(basetemp)
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:  # an xdist worker: the controller reports it
        worker_output["leaked_processes"] = leaked
        return
    if not leaked:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes started by tests outlived the session:\n  " + "\n  ".join(leaked)
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def identity_of(runs, job) -> dict[str, str | None]:
    """What the run of ``job`` (found by run name) recorded it read: the JobSpec identity fields."""
    (run,) = [r for r in runs if r.data.tags.get("mlflow.runName") == job.run_name]
    return {"data_version": run.data.tags["data_version"], "weights_sha256": run.data.tags.get("weights_sha256")}
