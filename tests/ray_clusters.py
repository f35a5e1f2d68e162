"""Ray clusters of several nodes on one machine, for tests of what happens beyond one machine.

- :func:`head_with_isolated_worker`: a head node plus a worker node started in its own
  mount namespace (``unshare -m``) with private tmpfs mounts over the given paths, so
  that node cannot see the driver's files (``$TRANSFUSION_HOME``, Ray's temp dir) — a
  second machine that shares no disk, on loopback.
- :func:`fake_autoscaling_cluster`: Ray's fake multi-node autoscaler (what
  ``ray.cluster_utils.AutoscalingCluster`` drives) with one worker type, in its own PID
  namespace. ``AutoscalingCluster`` itself runs ``ray stop --force``, which would kill
  every Ray on the machine (the test session's included), and reads an example config
  the Ray wheel does not ship; so the cluster config is written here and the whole
  cluster lives in a PID namespace that is torn down with it.

Both need root (``unshare``); both use token authentication like any Ray >= 2.59 cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flows.runtime import SERVICE_START_TIMEOUT_S, poll_until, port_is_taken, stop_process_group

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def can_isolate() -> bool:
    """Whether this machine lets us make mount and PID namespaces (root with ``unshare``)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "-pf", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running cluster: its address, the environment that reaches it, and its processes."""

    address: str
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def alive_nodes(self) -> list[dict]:
        """``ray list nodes``-style records of the live nodes, read through a fresh driver process."""
        code = (
            "import json, ray; ray.init(logging_level='ERROR');"
            " print('NODES=' + json.dumps([n for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **self.env}, capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0:
            raise RuntimeError(f"could not list nodes: {out.stderr.strip().splitlines()[-1:]}")
        # The autoscaler's event lines go to the same stdout.
        line = next(x for x in out.stdout.splitlines() if x.startswith("NODES="))
        return json.loads(line.removeprefix("NODES="))


def _auth_env() -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _wait_for_port(port: int, process: subprocess.Popen, *, log: Path) -> None:
    poll_until(lambda: port_is_taken("127.0.0.1", port), what=f"Ray on port {port}", timeout=SERVICE_START_TIMEOUT_S,
               process=process, log_path=log)  # fmt: skip


def _start(command: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


@contextmanager
def head_with_isolated_worker(
    workdir: Path, *, private: list[Path], head_cpus: int = 1, worker_cpus: int = 1, env: dict | None = None
) -> Iterator[Cluster]:
    """A head node and one worker node that sees a private tmpfs at each of ``private``.

    The worker carries the custom resource ``isolated: 1`` so tests can tell its jobs apart.
    Both nodes live in PID namespaces of their own, so stopping them leaves nothing behind.
    """
    port = free_port()
    auth = {**_auth_env(), **(env or {})}
    temp_dir = Path("/tmp") / f"tf-mn-{port}"
    head = _start(
        ["unshare", "-pf", "--mount-proc", *RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--num-cpus={head_cpus}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=auth, log=workdir / "ray-head.log",
    )  # fmt: skip
    cluster = Cluster(address=f"127.0.0.1:{port}", env={**auth, "RAY_ADDRESS": f"127.0.0.1:{port}"}, processes=[head])
    try:
        _wait_for_port(port, head, log=workdir / "ray-head.log")
        mounts = " && ".join(f"mkdir -p {p} && mount -t tmpfs tmpfs {p}" for p in [*private, temp_dir])
        join = " ".join([
            *RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", f"--num-cpus={worker_cpus}",
            "--resources='{\"isolated\": 1}'", "--block",
        ])  # fmt: skip
        worker = _start(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "-pf",
                "--mount-proc",
                "sh",
                "-c",
                f"{mounts} && exec {join}",
            ],  # fmt: skip
            env=auth,
            log=workdir / "ray-worker.log",
        )
        cluster.processes.append(worker)
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        while len(cluster.alive_nodes()) < 2:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the isolated worker node did not join; see {workdir / 'ray-worker.log'}")
            time.sleep(1)
        yield cluster
    finally:
        for process in reversed(cluster.processes):
            stop_process_group(process, timeout=15)
        shutil.rmtree(temp_dir, ignore_errors=True)


def isolated_raylets(private: Path) -> list[int]:
    """Pids of raylets that see a tmpfs of their own at ``private`` (the isolated node's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "raylet":
                continue
            mounts = (entry / "mounts").read_text().splitlines()
        except OSError:
            continue
        if any(line.split()[1] == str(private) and line.split()[2] == "tmpfs" for line in mounts):
            found.append(int(entry.name))
    return found


def _fake_autoscaler_config(*, port: int, head_cpus: int, worker_type: dict, idle_timeout_s: float) -> dict:
    return {
        "cluster_name": "transfusion-fake",
        "max_workers": int(worker_type["max_workers"]),
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "worker": {"node_config": {}, **worker_type},
        },
        "head_node_type": "ray.head.default",
        "docker": {},
        "auth": {"ssh_user": "nobody"},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextmanager
def fake_autoscaling_cluster(
    workdir: Path, *, worker_resources: dict, max_workers: int, head_cpus: int = 1, idle_timeout_s: float = 6.0
) -> Iterator[Cluster]:
    """A head whose autoscaler adds worker nodes (``worker_resources`` each, 0..``max_workers``) on demand."""
    port = free_port()
    auth = _auth_env()
    config = _fake_autoscaler_config(
        port=port,
        head_cpus=head_cpus,
        worker_type={"resources": worker_resources, "min_workers": 0, "max_workers": max_workers},
        idle_timeout_s=idle_timeout_s,
    )
    config_path = workdir / "autoscaler.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    head = _start(
        ["unshare", "-pf", "--mount-proc", *RAY, "start", "--head", "--block", f"--autoscaling-config={config_path}",
         "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={head_cpus}", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir=/tmp/tf-as-{port}"],
        env={**auth, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
        log=workdir / "ray-head.log",
    )  # fmt: skip
    cluster = Cluster(address=f"127.0.0.1:{port}", env={**auth, "RAY_ADDRESS": f"127.0.0.1:{port}"}, processes=[head])
    try:
        _wait_for_port(port, head, log=workdir / "ray-head.log")
        yield cluster
    finally:
        stop_process_group(head, timeout=15)
        shutil.rmtree(f"/tmp/tf-as-{port}", ignore_errors=True)
