"""Two ``transfusion run`` of one grid at once against one tracking server: each job trains once."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, command_env

pytestmark = pytest.mark.slow


def _start_grid(home, tracking_uri: str) -> subprocess.Popen:
    env = command_env(home, {"MLFLOW_TRACKING_URI": tracking_uri})
    # Steps enough that each job outlasts the other command's start-up, so the grids overlap.
    argv = [sys.executable, "-m", "flows.cli", "run", "smoke", "--set", "train.steps=30"]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_grids_at_once_train_each_job_exactly_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.runtime import start_mlflow_server

    server = start_mlflow_server(tmp_path / "tracking")
    try:
        grids = [_start_grid(tmp_path / f"home-{i}", server.url) for i in range(2)]
        outputs = [grid.communicate(timeout=900)[0] for grid in grids]
        for grid, output in zip(grids, outputs, strict=True):
            assert grid.returncode == 0, output
        client = MlflowClient(server.url)
        (experiment,) = [e for e in client.search_experiments() if e.name.startswith("smoke+")]
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`transfusion.role` = 'job'")
    finally:
        server.stop()

    # Each job trained in exactly one place: one run per job, FINISHED, no lease left on it.
    keys = [run.data.tags["job_key"] for run in runs]
    assert len(keys) == len(set(keys)) == 2, [(r.info.run_id, r.info.status, r.data.tags["job_key"]) for r in runs]
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert not [tag for run in runs for tag in run.data.tags if tag.startswith("lease.")]

    totals = []
    for output in outputs:
        (line,) = re.findall(r"Grid smoke\+\w+: (\d+) trained, (\d+) already done, (?:(\d+) trained by another "
                             r"grid run, )?(\d+) failed", output)  # fmt: skip
        trained, done, elsewhere, failed = (int(n or 0) for n in line)
        assert trained + done + elsewhere == 2 and failed == 0, output
        # Whatever the other grid trained while this one ran is named, with who trained it.
        assert output.count("Trained by another grid run meanwhile:") == elsewhere, output
        totals.append((trained, elsewhere))
    # Both summaries, so a failure shows which grid trained what (a trained run may be in the trash).
    assert sum(trained for trained, _ in totals) == 2, "\n---\n".join(output[-4000:] for output in outputs)
    assert any(elsewhere for _, elsewhere in totals), outputs  # the two grids overlapped
