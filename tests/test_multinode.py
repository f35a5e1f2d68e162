"""Beyond one machine, on loopback: nodes that share no disk, GPU packing, an autoscaling cluster.

Every grid here runs through the real ``transfusion run`` command against a Ray cluster
given by ``RAY_ADDRESS`` (tests/ray_clusters.py starts them), with the session's MLflow
server and, where nodes share no disk, data and checkpoints through the real S3 server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, command_env
from tests.ray_clusters import can_isolate, fake_autoscaling_cluster, head_with_isolated_worker, isolated_raylets
from transfusion import tracking

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_isolate(), reason="needs root and unshare (mount/PID namespaces)"),
]
pytest_plugins = ("s3_server",)

DATA = {"train": 240, "val": 64, "test": 64}


def _grid_file(path: Path, name: str, *, seeds: list[int], **train) -> Path:
    grid = {
        "name": name, "dataset": "synthetic-retina", "dataset_options": DATA, "models": ["cbr-tiny"],
        "inits": ["random"], "data_sizes": [120], "seeds": seeds,
        "train": {"batch_size": 16, "resolution": 32, "probe_size": 16, "eval_batch_size": 64, **train},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(grid))
    return path


def _start_grid(grid_file: Path, *, home: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(grid_file)], cwd=REPO, env=command_env(home, env),
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _job_runs(grid: str) -> list:
    experiment = tracking.client().get_experiment_by_name(grid)
    if experiment is None:
        return []
    runs = tracking.client().search_runs([experiment.experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("transfusion.role") == "job"]


def _training_window(run) -> tuple[float, float]:
    """(first, last) wall-clock second at which the job logged a training loss."""
    stamps = [m.timestamp / 1000 for m in tracking.client().get_metric_history(run.info.run_id, "train/loss")]
    return min(stamps), max(stamps)


def _overlap(runs: list) -> float:
    """Seconds during which every one of ``runs`` was training at once (<= 0: never all together)."""
    windows = [_training_window(r) for r in runs]
    return min(end for _, end in windows) - max(start for start, _ in windows)


def test_a_node_that_shares_no_disk_trains_and_its_loss_costs_one_resume(mlflow_server, s3_server, tmp_path):
    home = tmp_path / "driver-home"  # the isolated node sees an empty tmpfs here
    home.mkdir()
    s3_server.create_bucket("multinode")
    s3 = s3_server.env()
    grid_file = _grid_file(
        tmp_path / "multinode.yaml", "multinode", seeds=[0, 1], steps=40, eval_every=10, checkpoint_every=5,
        cpus_per_job=1, max_failures=3,
    )  # fmt: skip
    with head_with_isolated_worker(tmp_path / "cluster", private=[home], env=s3) as cluster:
        isolated = next(n["NodeID"] for n in cluster.alive_nodes() if n["Resources"].get("isolated"))
        env = {**s3, **cluster.env, "MLFLOW_TRACKING_URI": mlflow_server.url,
               "TRANSFUSION_STORAGE_PATH": "s3://multinode/ray"}  # fmt: skip
        log = tmp_path / "grid.log"
        process = _start_grid(grid_file, home=home, env=env, log=log)
        victim, deadline = None, time.monotonic() + 600
        while victim is None:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no job reached a checkpoint on the isolated node"
            for run in _job_runs("multinode"):
                steps = [s for s, _ in tracking.metric_history(run.info.run_id, "train/loss")]
                if run.data.tags.get("ray_node") == isolated and steps and max(steps) >= 12:
                    victim = run.info.run_id
            time.sleep(1)
        raylets = isolated_raylets(home)
        assert len(raylets) == 1
        os.kill(raylets[0], signal.SIGKILL)
        assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
    runs = _job_runs("multinode")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    resumed = next(r for r in runs if r.info.run_id == victim)
    # The lost job finished on the other node, in the same run, from its checkpoint at step 10:
    # step 0's validation ran once, and only steps after that checkpoint were trained twice.
    assert resumed.data.tags["ray_node"] != isolated
    assert [s for s, _ in tracking.metric_history(victim, "val/auc")].count(0) == 1
    losses = [s for s, _ in tracking.metric_history(victim, "train/loss")]
    assert sorted(set(losses))[-1] == 40 and all(losses.count(s) == 1 for s in set(losses) if s <= 10)
    # Nothing of the driver's disk was read on the isolated node: the dataset came from S3.
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="multinode").get("Contents", [])]
    assert any(k.startswith("ray/datasets/") and k.endswith("/manifest.json") for k in keys), keys
    assert any(f"/{victim}/state-" in k for k in keys), keys


def test_four_quarter_gpu_jobs_share_one_gpu_and_a_whole_gpu_job_runs_alone(mlflow_server, tmp_path):
    port = str(_free_port())
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()}
    head = subprocess.Popen(
        ["unshare", "-pf", "--mount-proc", sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4", "--num-gpus=1",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir=/tmp/tf-gpu-{port}"],
        env={**os.environ, **auth}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        env = {**auth, "RAY_ADDRESS": f"127.0.0.1:{port}", "MLFLOW_TRACKING_URI": mlflow_server.url}
        quarter = _grid_file(tmp_path / "quarter.yaml", "gpu-quarter", seeds=[0, 1, 2, 3], steps=150, eval_every=50,
                             cpus_per_job=1, gpus_per_job=0.25)  # fmt: skip
        whole = _grid_file(tmp_path / "whole.yaml", "gpu-whole", seeds=[0, 1], steps=40, eval_every=20,
                           cpus_per_job=1, gpus_per_job=1.0)  # fmt: skip
        for grid_file in (quarter, whole):
            log = tmp_path / f"{grid_file.stem}.log"
            process = _start_grid(grid_file, home=tmp_path / "home", env=env, log=log)
            assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    quarters, wholes = _job_runs("gpu-quarter"), _job_runs("gpu-whole")
    assert len(quarters) == 4 and len(wholes) == 2
    assert all(r.info.status == "FINISHED" for r in quarters + wholes)
    # The four quarter-GPU jobs were all running at once; the whole-GPU jobs never overlapped.
    assert _overlap(quarters) > 0, [_training_window(r) for r in quarters]
    assert _overlap(wholes) < 0, [_training_window(r) for r in wholes]


def test_pending_gpu_jobs_make_the_autoscaler_add_nodes_that_go_after_the_grid(mlflow_server, tmp_path):
    grid_file = _grid_file(tmp_path / "autoscale.yaml", "autoscale", seeds=list(range(6)), steps=20, eval_every=20,
                           cpus_per_job=1, gpus_per_job=1.0)  # fmt: skip
    with fake_autoscaling_cluster(
        tmp_path / "cluster", worker_resources={"CPU": 1, "GPU": 1}, max_workers=3, idle_timeout_s=5
    ) as cluster:
        env = {**cluster.env, "MLFLOW_TRACKING_URI": mlflow_server.url}
        log = tmp_path / "grid.log"
        process = _start_grid(grid_file, home=tmp_path / "home", env=env, log=log)
        most_nodes = 1
        while process.poll() is None:
            most_nodes = max(most_nodes, len(cluster.alive_nodes()))
            time.sleep(5)  # each look is a fresh Ray driver (about a CPU second); nodes live far longer
        assert process.returncode == 0, log.read_text()[-3000:]
        runs = _job_runs("autoscale")
        assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
        assert most_nodes >= 3, most_nodes  # the head and at least two GPU nodes
        # At least two jobs ran at the same time, on different nodes.
        spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans
        assert len({r.data.tags["ray_node"] for r in runs}) >= 2
        deadline = time.monotonic() + 90
        while len(cluster.alive_nodes()) > 1:
            assert time.monotonic() < deadline, "the GPU nodes were not released after the grid"
            time.sleep(3)


def _free_port() -> int:
    from tests.ray_clusters import free_port

    return free_port()
