"""Runs training jobs under Ray Train: the only module that imports Ray.

Starting a Ray Train run costs seconds (a controller actor, a worker group, importing
torch in a fresh process) — as much as a small CBR job's whole training on a GPU. So
jobs run on a :class:`JobPool`: up to ``slots`` warm Ray Train runs ("members"), each a
worker group whose train function takes jobs from a :class:`JobBroker` actor one after
another, until it has had none for ``idle_timeout_s``. Ray Train still places, scales
and restarts the workers; a job's training state lives in its own checkpoint folder
(:mod:`transfusion.checkpoints`), so a restarted worker, or a later grid run, continues
the job it was running from its last checkpoint.

The plain loop of :mod:`transfusion.train` is touched at two points, as in Ray's own
examples: the worker turns the job's config dict into a :class:`JobSpec`, and the
model goes through ``prepare_model`` when there are several workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from transfusion.checkpoints import JobCheckpoints, storage_filesystem
from transfusion.config import JobSpec

log = logging.getLogger(__name__)

# Ray Train V2's controller polls its workers every 2 s by default; a short interval
# lets it notice a finished or failed member sooner.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_V2_ENABLED": "1",
}
MEMBER_IDLE_TIMEOUT_S = 60.0
# Restarts one member may take over its whole life (each job has its own max_failures):
# a bound on a worker that crashes before it can take any job.
MEMBER_RESTART_LIMIT = 20


def ensure_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> dict[str, float]:
    """Connects to ``$RAY_ADDRESS`` or starts a local Ray; returns cluster resources."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        env_vars = {
            k: os.environ[k] for k in (*RAY_ENV_DEFAULTS, "MLFLOW_TRACKING_URI", "TRANSFUSION_HOME") if k in os.environ
        }
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": env_vars},
            "logging_level": logging.WARNING,
            "log_to_driver": bool(os.environ.get("TRANSFUSION_RAY_LOGS")),
            "include_dashboard": False,
        }
        if not os.environ.get("RAY_ADDRESS"):
            kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus)
        else:
            kwargs.pop("include_dashboard")
        ray.init(**kwargs)
    return ray.cluster_resources()


def shutdown_ray() -> None:
    close_pools()
    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a worker needs, as plain data (it crosses process boundaries)."""

    spec: dict
    run_id: str
    tracking_uri: str
    dataset_root: str
    source_uri: str | None
    fault_at_step: int | None = None
    kill_at_step: int | None = None
    kill_marker: str | None = None

    def as_config(self) -> dict:
        return dict(self.__dict__)


class JobFailedError(RuntimeError):
    """The job stopped for a reason a restart cannot fix (e.g. a NaN loss), or ran out of restarts."""


def scaling_for(spec: JobSpec) -> ScalingConfig:
    """One worker per job by default; several with DDP; fractional GPUs for small models."""
    t = spec.train
    use_gpu = t.gpus_per_job > 0
    resources = {"CPU": t.cpus_per_job}
    if use_gpu:
        resources["GPU"] = t.gpus_per_job
    return ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def storage_location(path: str) -> tuple[str, Any]:
    """(storage_path, filesystem) for Ray Train's RunConfig; ``s3://`` honours ``AWS_ENDPOINT_URL``."""
    if not path.startswith("s3://"):
        return path, None
    filesystem, inner = storage_filesystem(path)
    return inner, filesystem


def checkpoints_for(spec: JobSpec, storage_path: str, run_id: str) -> JobCheckpoints:
    """One folder per (job, MLflow run): states another run of the job left never mix in."""
    return JobCheckpoints(storage_path, f"{spec.grid}-{spec.job_key}/{run_id}")


# --- the worker side ------------------------------------------------------------------


def _run_job(request: LaunchRequest, *, storage_path: str, rank: int, world_size: int) -> dict[str, float]:
    """One job in this worker: resume from its checkpoint if it has one, train, log."""
    from transfusion.data.prepared import PreparedDataset
    from transfusion.tracking import MlflowHooks, test_dataset_of
    from transfusion.train import NonFiniteLossError, run_training

    spec = JobSpec.model_validate(request.spec)
    torch.set_num_threads(max(1, spec.train.threads or int(spec.train.cpus_per_job)))
    checkpoints = checkpoints_for(spec, storage_path, request.run_id)
    resume = checkpoints.latest()

    def save_checkpoint(state: dict, *, step: int, metrics: dict[str, float]) -> None:
        if rank == 0:
            checkpoints.save({**state, "run_id": request.run_id}, step=step)

    source_state = None
    if request.source_uri and resume is None:
        from transfusion.pretrained import load_state_dict_from_uri

        loaded = load_state_dict_from_uri(request.source_uri)
        source_state = loaded.state_dict
        if rank == 0:
            from transfusion.tracking import log_params

            log_params(request.run_id, {"pretrained_sha256": loaded.sha256}, uri=request.tracking_uri)

    def crash_once(step: int) -> None:
        # Fault injection: SIGKILL this worker once (the marker survives the restart).
        if step == request.kill_at_step and request.kill_marker and not os.path.exists(request.kill_marker):
            open(request.kill_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    dataset = PreparedDataset.open(request.dataset_root)
    hooks = MlflowHooks(
        request.run_id,
        uri=request.tracking_uri,
        checkpoint=save_checkpoint,
        test_dataset=test_dataset_of(spec, dataset.meta),
    )
    try:
        with contextlib.nullcontext(hooks) if rank else hooks:
            result = run_training(
                spec,
                dataset,
                hooks=hooks,
                source_state=source_state,
                resume=resume,
                prepare_model=ray.train.torch.prepare_model if world_size > 1 else None,
                rank=rank,
                world_size=world_size,
                fault_at_step=request.fault_at_step,
                on_step=crash_once if request.kill_at_step is not None else None,
            )
    except NonFiniteLossError as exc:
        # Deterministic: a restart would diverge again, so report instead of raising.
        return {"failed": f"NonFiniteLossError: {exc}"}
    return {
        "steps": float(result.steps),
        **result.final_metrics,
        "time/setup_s": result.setup_seconds,
        "time/finish_s": result.finish_seconds,
    }


def _from_rank_zero(fetch, *, rank: int, world_size: int):
    """``fetch()`` on rank 0, the same value on every rank (jobs are shared by the group)."""
    if world_size == 1:
        return fetch()
    from ray.train.collective import broadcast_from_rank_zero

    return broadcast_from_rank_zero(fetch() if rank == 0 else None)


_BROKER_GONE = "broker-gone"


def _serve_jobs(config: dict) -> None:
    """Train function of a pool member: runs the broker's jobs until none comes for a while."""
    broker, member, storage_path = config["broker"], config["member"], config["storage_path"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    def ask(method: str, *args):
        try:
            return ray.get(getattr(broker, method).remote(member, *args))
        except ray.exceptions.RayActorError:
            return _BROKER_GONE  # the pool was closed under a running job: nobody waits for results

    # After a restart the broker hands back the job this member was running.
    resumed = _from_rank_zero(lambda: ask("resume"), rank=rank, world_size=world_size)
    if resumed == _BROKER_GONE:
        return
    start, request = resumed
    while True:
        gc.collect()  # what the last job left, before the next one allocates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if request is None:
            request = _from_rank_zero(lambda: ask("next_job", start), rank=rank, world_size=world_size)
        if request is None or request == _BROKER_GONE:
            return
        try:
            result = _run_job(LaunchRequest(**request), storage_path=storage_path, rank=rank, world_size=world_size)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            retry = ask("job_error", start, reason) if rank == 0 else True
            if retry == _BROKER_GONE:
                return
            if retry or world_size > 1:
                raise  # Ray Train restarts the worker group; the job continues from its checkpoint
            request = None  # the broker failed the job; this process is healthy, so take the next
            continue
        if rank == 0:
            ask("finish", start, result)
        request = None


@dataclass
class _QueuedJob:
    request: dict
    future: asyncio.Future
    submitted: float  # broker clock, like every time below
    picked: float | None = None  # first hand-out
    failures: int = 0
    reason: str | None = None

    @property
    def max_failures(self) -> int:
        return int(self.request["spec"]["train"]["max_failures"])


@dataclass
class _Member:
    job: str | None = None  # run_id of the job it is running
    starts: int = 0  # (re)starts of its worker group: a call from an older start is stale
    served: int = 0


# Members in a row whose Ray Train run ended before they took any job: then the queued
# jobs fail instead of starting members forever (e.g. workers that cannot even start).
BARREN_MEMBER_LIMIT = 3


@ray.remote(num_cpus=0)
class JobBroker:
    """Hands queued jobs to pool members and their results back (one asyncio loop, no races)."""

    def __init__(self, *, slots: int, idle_timeout_s: float) -> None:
        self._slots = slots
        self._idle_timeout_s = idle_timeout_s
        self._queue: deque[str] = deque()
        self._jobs: dict[str, _QueuedJob] = {}
        self._members: dict[int, _Member] = {}
        self._next_member = 0
        self._barren = 0
        self._closed = False
        self._changed = asyncio.Condition()

    def _members_to_start(self) -> list[int]:
        """New member ids so that every queued job has a member, up to ``slots``."""
        if self._closed:
            return []
        busy = sum(m.job is not None for m in self._members.values())
        wanted = min(self._slots, busy + len(self._queue))
        started = []
        while len(self._members) < wanted:
            self._members[self._next_member] = _Member()
            started.append(self._next_member)
            self._next_member += 1
        return started

    def _fail(self, run_id: str | None, reason: str) -> None:
        job = self._jobs.get(run_id) if run_id else None
        if job is not None and not job.future.done():
            job.future.set_result({"failed": reason})

    def _fail_job_of(self, member: _Member, reason: str) -> None:
        run_id, member.job = member.job, None
        self._fail(run_id, reason)

    def _current(self, member: int, start: int) -> _Member | None:
        state = self._members.get(member)
        return state if state is not None and state.starts == start else None

    async def submit(self, request: dict) -> list[int]:
        """Queues a job; returns the members the caller must start for it."""
        if self._closed:
            raise RuntimeError("the job pool is closed")
        run_id = request["run_id"]
        loop = asyncio.get_running_loop()
        self._jobs[run_id] = _QueuedJob(request, loop.create_future(), submitted=loop.time())
        self._queue.append(run_id)
        async with self._changed:
            self._changed.notify_all()
        return self._members_to_start()

    async def result(self, run_id: str) -> dict:
        """The job's final metrics (or ``{"failed": reason}``), with ``time/launch_s`` added."""
        job = self._jobs[run_id]
        try:
            value = dict(await job.future)
        finally:
            self._jobs.pop(run_id, None)
        if job.picked is not None and "failed" not in value:
            value["time/launch_s"] = job.picked - job.submitted
        return value

    async def resume(self, member: int) -> tuple[int, dict | None]:
        """Called at each (re)start of a member: (its start number, the job to continue)."""
        state = self._members.get(member)
        if state is None:
            return 0, None
        state.starts += 1
        if state.starts == 1 or state.job is None:
            return state.starts, None
        job = self._jobs[state.job]
        job.failures += 1
        if job.failures > job.max_failures:
            reason = job.reason or "the worker process died"
            self._fail_job_of(state, f"gave up after {job.failures} failures: {reason}")
            return state.starts, None
        return state.starts, job.request

    async def next_job(self, member: int, start: int) -> dict | None:
        """The next queued job for ``member``; None (and the member retires) when idle too long.

        A wait left by a worker group that has since restarted (``start`` is old) gets
        None without taking a job: its caller is gone.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._idle_timeout_s
        async with self._changed:
            while True:
                state = self._current(member, start)
                if state is None:
                    return None
                if self._closed:
                    self._members.pop(member, None)
                    return None
                if self._queue:
                    state.job = self._queue.popleft()
                    job = self._jobs[state.job]
                    job.picked = job.picked if job.picked is not None else loop.time()
                    self._barren = 0
                    return job.request
                remaining = deadline - loop.time()
                if remaining <= 0:
                    # Retiring here, with the queue empty, is atomic: a job queued later
                    # sees one member fewer and has the caller start a new one.
                    del self._members[member]
                    return None
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    pass

    async def job_error(self, member: int, start: int, reason: str) -> bool:
        """Records why a job raised; True if it has a restart left, else the job fails now."""
        state = self._current(member, start)
        if state is None or state.job is None:
            return False
        job = self._jobs[state.job]
        job.reason = reason
        if job.failures + 1 > job.max_failures:
            suffix = f" (after {job.failures} restarts)" if job.failures else ""
            self._fail_job_of(state, reason + suffix)
            return False
        return True

    async def finish(self, member: int, start: int, result: dict) -> None:
        state = self._current(member, start)
        if state is None:
            return
        run_id, state.job = state.job, None
        state.served += 1
        job = self._jobs.get(run_id) if run_id else None
        if job is not None and not job.future.done():
            job.future.set_result(result)

    async def member_gone(self, member: int, reason: str | None) -> list[int]:
        """A member's Ray Train run ended: its job goes back to the queue if it has a
        restart left (else it fails); returns the members to start."""
        state = self._members.pop(member, None)
        if state is not None and state.job is not None:
            job = self._jobs[state.job]
            job.failures += 1
            job.reason = job.reason or f"the Ray Train worker group stopped: {reason or 'no reason given'}"
            if job.failures <= job.max_failures and not self._closed:
                self._queue.appendleft(state.job)
            else:
                self._fail_job_of(state, f"gave up after {job.failures} failures: {job.reason}")
        elif state is not None and state.served == 0 and reason is not None:
            self._barren += 1
            if self._barren >= BARREN_MEMBER_LIMIT:
                for run_id in self._queue:
                    self._fail(run_id, f"{self._barren} pool members in a row failed before taking a job: {reason}")
                self._queue.clear()
                self._barren = 0
        return self._members_to_start()

    async def set_slots(self, slots: int) -> None:
        self._slots = slots

    async def close(self) -> None:
        self._closed = True
        for run_id in self._queue:
            self._fail(run_id, "the job pool was closed before the job started")
        self._queue.clear()
        async with self._changed:
            self._changed.notify_all()


@dataclass
class JobPool:
    """Up to ``slots`` warm Ray Train runs that train submitted jobs one after another.

    ``run(request)`` blocks until the job is done (call it from several threads to run
    jobs side by side) and returns its final metrics plus ``time/launch_s`` (queued until
    a worker first picked it up: seconds only when a member had to start).
    """

    scaling: ScalingConfig
    storage_path: str
    slots: int = 1
    name: str = field(default_factory=lambda: f"pool-{uuid.uuid4().hex[:8]}")
    idle_timeout_s: float = MEMBER_IDLE_TIMEOUT_S
    _broker: Any = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        # Workers resolve a relative folder against their own working directory.
        if not self.storage_path.startswith("s3://"):
            self.storage_path = os.path.abspath(self.storage_path)

    def _ensure_broker(self):
        with self._lock:
            if self._closed:
                raise RuntimeError(f"job pool {self.name} is closed")
            if self._broker is None:
                # On the driver's node: it lives as long as this process, not an autoscaled worker node.
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self._broker = JobBroker.options(max_concurrency=10_000, scheduling_strategy=here).remote(
                    slots=self.slots, idle_timeout_s=self.idle_timeout_s
                )
            return self._broker

    def resize(self, slots: int) -> None:
        self.slots = slots
        if self._broker is not None:
            ray.get(self._broker.set_slots.remote(slots))

    def run(self, request: LaunchRequest) -> dict[str, float]:
        broker = self._ensure_broker()
        self._start_members(ray.get(broker.submit.remote(request.as_config())))
        value = dict(ray.get(broker.result.remote(request.run_id)))
        if "failed" in value:
            raise JobFailedError(value["failed"])
        return value

    def _start_members(self, members: list[int]) -> None:
        for member in members:
            thread = threading.Thread(
                target=self._serve_member, args=(member,), name=f"{self.name}-m{member}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve_member(self, member: int) -> None:
        path, filesystem = storage_location(self.storage_path)
        # One worker needs no process group: V2's plain data-parallel trainer skips the
        # torch.distributed set-up and starts the worker about a second sooner.
        trainer_class = TorchTrainer if self.scaling.num_workers > 1 else DataParallelTrainer
        reason = None
        try:
            trainer = trainer_class(
                _serve_jobs,
                train_loop_config={"broker": self._broker, "member": member, "storage_path": self.storage_path},
                scaling_config=self.scaling,
                run_config=RunConfig(
                    name=f"{self.name}-m{member}",
                    storage_path=path,
                    storage_filesystem=filesystem,
                    failure_config=FailureConfig(max_failures=MEMBER_RESTART_LIMIT),
                ),
            )
            result = trainer.fit()
            if result.error is not None:
                reason = f"{type(result.error).__name__}: {result.error}"
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason:
            reason = reason.splitlines()[0][:500]
            log.warning("pool member %s stopped: %s", member, reason)
        try:
            self._start_members(ray.get(self._broker.member_gone.remote(member, reason)))
        except Exception:  # the broker is gone: the pool was closed
            log.debug("broker gone after member %s", member, exc_info=True)

    def close(self, *, timeout: float = 60.0) -> None:
        """Lets idle members finish, fails jobs still queued, and stops the broker."""
        with self._lock:
            self._closed = True
            broker, self._broker = self._broker, None
        if broker is None:
            return
        try:
            ray.get(broker.close.remote())
            deadline = time.monotonic() + timeout
            for thread in list(self._threads):
                thread.join(max(0.0, deadline - time.monotonic()))
        finally:
            ray.kill(broker)


_POOLS: dict[tuple, JobPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(spec: JobSpec, *, storage_path: str, slots: int) -> JobPool:
    """This process's pool for jobs scaled like ``spec`` (jobs of several grids share it)."""
    scaling = scaling_for(spec)
    key = (scaling.num_workers, scaling.use_gpu, tuple(sorted(scaling.resources_per_worker.items())), storage_path)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = JobPool(scaling, storage_path, slots=slots)
        elif pool.slots != slots:
            pool.resize(slots)
        return pool


def close_pools() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        try:
            pool.close()
        except Exception:
            log.warning("could not close %s", pool.name, exc_info=True)


def fit_job(request: LaunchRequest, *, storage_path: str) -> dict[str, float]:
    """Runs one job on a pool of its own (started for it, closed after it)."""
    spec = JobSpec.model_validate(request.spec)
    pool = JobPool(scaling_for(spec), storage_path, slots=1, name=f"{spec.grid}-{spec.job_key}-{uuid.uuid4().hex[:6]}")
    try:
        return pool.run(request)
    finally:
        pool.close()
