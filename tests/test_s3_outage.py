"""The object store goes away for a while: checkpoint uploads and dataset publishing wait for it.

The retry policy (:func:`transfusion.object_store.with_backoff`) is tested on a fake clock;
the outage itself on a real S3 server (SeaweedFS) stopped for ~10 s and started again on
the same port and data directory.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import pytest
import torch

from transfusion.checkpoints import JobCheckpoints
from transfusion.config import JobSpec, TrainSettings
from transfusion.data.node_cache import fetch_dataset, publish_dataset
from transfusion.object_store import ObjectStoreUnavailable, with_backoff
from transfusion.train import RecordingHooks, run_training

pytest_plugins = ("s3_server",)

OUTAGE_S = 10.0


def _flaky(failures: int, exc: Exception):
    calls = []

    def action():
        calls.append(1)
        if len(calls) <= failures:
            raise exc
        return "ok"

    return action, calls


def test_backoff_grows_with_jitter_logs_each_retry_and_stops_at_its_budget(caplog):
    slept: list[float] = []
    action, calls = _flaky(4, OSError("AWS Error NETWORK_CONNECTION during PutObject"))
    with caplog.at_level(logging.WARNING, logger="transfusion.object_store"):
        result = with_backoff(action, what="upload x", base_delay_s=1.0, max_delay_s=4.0, sleep=slept.append,
                              rng=random.Random(0))  # fmt: skip
    assert result == "ok" and len(calls) == 5
    # The n-th wait lies in [d/2, d], d = min(4, 2**n): it grows, is capped, and is jittered.
    for n, delay in enumerate(slept):
        ceiling = min(4.0, 2.0**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d / min(4.0, 2.0**n), 6) for n, d in enumerate(slept)}) > 1  # not a fixed fraction
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 4 and all("upload x failed (OSError); retry" in m for m in retries)

    # A store that never comes back: the total wait stays within the budget, then one line.
    slept.clear()
    never, _ = _flaky(10**6, OSError("AWS Error NETWORK_CONNECTION"))
    with pytest.raises(ObjectStoreUnavailable, match=r"upload y: the object store did not answer after \d+ attempts"):
        with_backoff(never, what="upload y", budget_s=20.0, sleep=slept.append, rng=random.Random(1))
    assert 10.0 < sum(slept) <= 20.0


@pytest.mark.parametrize("exc", [FileNotFoundError("no such key"), PermissionError("denied"),
                                 OSError("AWS Error ACCESS_DENIED during PutObject"), ValueError("bad")])  # fmt: skip
def test_answers_that_retrying_cannot_change_fail_at_once(exc):
    action, calls = _flaky(1, exc)
    with pytest.raises(type(exc)):
        with_backoff(action, what="x", sleep=lambda _: pytest.fail("slept before a permanent error"))
    assert len(calls) == 1


@pytest.fixture
def outage_server(tmp_path, monkeypatch):
    """A server of this test's own (the session's stays up), with the environment pointed at it."""
    from tests.s3_server import start_test_s3_server

    server = start_test_s3_server(tmp_path / "s3")
    server.create_bucket("outage")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.service.stop()


def _outage(server, *, seconds: float = OUTAGE_S) -> threading.Thread:
    """Stops ``server`` now and starts it again on the same port and data after ``seconds``."""
    server.stop()

    def come_back() -> None:
        time.sleep(seconds)
        server.start()

    thread = threading.Thread(target=come_back, daemon=True)
    thread.start()
    return thread


class _S3CheckpointHooks(RecordingHooks):
    """The loop's checkpoints go to S3 as a job's do; the store goes away at the first one."""

    def __init__(self, checkpoints: JobCheckpoints, server) -> None:
        super().__init__()
        self.store, self.server = checkpoints, server
        self.outage: threading.Thread | None = None
        self.saved: list[tuple[int, float]] = []

    def checkpoint(self, state, *, step, metrics):
        super().checkpoint(state, step=step, metrics=metrics)
        if self.outage is None:
            self.outage = _outage(self.server)
        started = time.monotonic()
        self.store.save(state, step=step)
        self.saved.append((step, time.monotonic() - started))


@pytest.mark.slow
def test_a_job_finishes_in_the_same_run_across_an_s3_outage(outage_server, tiny_retina, caplog):
    torch.set_num_threads(1)
    spec = JobSpec(model="cbr-tiny", init="random", dataset="synthetic-retina", data_size=160, seed=0,
                   dataset_options={"train": 240, "val": 64, "test": 64},
                   train=TrainSettings(steps=6, batch_size=16, eval_every=3, resolution=32, probe_size=16))  # fmt: skip
    store = JobCheckpoints("s3://outage/storage", "grid-job")
    hooks = _S3CheckpointHooks(store, outage_server)
    with caplog.at_level(logging.WARNING, logger="transfusion.object_store"):
        result = run_training(spec, tiny_retina, hooks=hooks)
    hooks.outage.join(timeout=30)
    assert result.steps == 6 and 0.0 <= result.final_metrics["test/auc"] <= 1.0
    # The first upload waited out the outage; the later ones went straight through.
    first_step, first_wait = hooks.saved[0]
    assert first_wait >= OUTAGE_S * 0.9, hooks.saved
    assert [step for step, _ in hooks.saved] == [step for step, _ in hooks.checkpoints]
    retries = [r.getMessage() for r in caplog.records if "upload checkpoint" in r.getMessage()]
    assert retries and all("retry" in m for m in retries) and len(set(retries)) == len(retries)
    # What the store holds after the outage is the job's last state, readable.
    latest = store.latest()
    assert latest is not None and latest["step"] == hooks.saved[-1][0] == 6


@pytest.mark.slow
def test_publishing_a_dataset_across_an_s3_outage_completes_with_a_manifest_written_last(
    outage_server, tiny_retina, tmp_path, caplog
):
    outage = _outage(outage_server)
    with caplog.at_level(logging.WARNING, logger="transfusion.object_store"):
        published = publish_dataset(tiny_retina, to="s3://outage/data")
    outage.join(timeout=30)
    assert any("retry" in r.getMessage() for r in caplog.records)
    copy = fetch_dataset(published.uri, cache=tmp_path / "node")
    assert copy.meta == tiny_retina.meta and set(published.files) <= {p.name for p in copy.root.iterdir()}


@pytest.mark.slow
def test_a_publish_that_outlasts_its_budget_fails_in_one_line_and_leaves_no_manifest(
    outage_server, tiny_retina, tmp_path, monkeypatch
):
    import transfusion.object_store as object_store

    monkeypatch.setattr(object_store, "RETRY_BUDGET_S", 2.0)
    client = outage_server.client()
    outage_server.stop()
    with pytest.raises(ObjectStoreUnavailable) as failure:
        publish_dataset(tiny_retina, to="s3://outage/data")
    assert "\n" not in str(failure.value) and "run again" in str(failure.value)
    outage_server.start()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="outage").get("Contents", [])]
    assert not [k for k in keys if k.endswith("manifest.json")]
    with pytest.raises(ValueError, match="no complete manifest.json"):
        fetch_dataset("s3://outage/data/datasets/x", cache=tmp_path / "node")


@pytest.mark.slow
def test_a_reader_never_trusts_objects_under_a_torn_or_partial_manifest(outage_server, tiny_retina, tmp_path):
    published = publish_dataset(tiny_retina, to="s3://outage/torn")
    client = outage_server.client()
    key = published.uri.removeprefix("s3://outage/") + "/manifest.json"
    manifest = client.get_object(Bucket="outage", Key=key)["Body"].read()
    # A manifest cut short, and one that lists no files: neither is trusted.
    for damaged in (manifest[: len(manifest) // 2], json.dumps({"key": "x", "meta": {}, "files": {}}).encode()):
        client.put_object(Bucket="outage", Key=key, Body=damaged)
        with pytest.raises(ValueError, match="no complete manifest.json"):
            fetch_dataset(published.uri, cache=tmp_path / "node")
    # The publisher takes a torn manifest for none and publishes the dataset again.
    assert publish_dataset(tiny_retina, to="s3://outage/torn") == published
    assert fetch_dataset(published.uri, cache=tmp_path / "node").meta == tiny_retina.meta
