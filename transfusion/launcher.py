"""Runs training jobs under Ray Train: the only module that imports Ray.

Starting a Ray Train run costs seconds (a controller actor, a worker group, importing
torch in a fresh process) — as much as a small CBR job's whole training on a GPU. So
jobs run on a :class:`JobPool`: up to ``slots`` warm Ray Train runs ("members"), each a
worker group whose train function takes jobs from a :class:`JobBroker` actor one after
another, until it has had none for ``idle_timeout_s``. The pool's rules (hand-out,
attempts, restarts, retirement) are plain data in :mod:`transfusion.job_broker`; the
actor only forwards to them and adds the waiting. Ray Train still places, scales
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
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from transfusion.checkpoints import JobCheckpoints, storage_filesystem
from transfusion.config import JobSpec
from transfusion.errors import first_line
from transfusion.job_broker import AfterError, JobBrokerState, JobEnd, Restart
from transfusion.preflight import check_ray_address

log = logging.getLogger(__name__)

# Ray Train V2's controller polls its workers every 2 s by default; a shorter interval
# lets it notice a failed member sooner. Each poll is a call into every worker for a
# member's whole life (members are long-lived), so not much shorter.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0",
    "RAY_TRAIN_V2_ENABLED": "1",
}
# A Ray of our own runs on this machine, which no cloud preempts: Ray Train's preemption
# watcher (one more actor process per member) only costs CPU there.
LOCAL_RAY_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
MEMBER_IDLE_TIMEOUT_S = 60.0
# Restarts one member may take over its whole life (each job has its own max_failures):
# a bound on a worker that crashes before it can take any job.
MEMBER_RESTART_LIMIT = 20


def ensure_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> dict[str, float]:
    """Connects to ``$RAY_ADDRESS`` or starts a local Ray; returns cluster resources."""
    local = not os.environ.get("RAY_ADDRESS")
    defaults = {**RAY_ENV_DEFAULTS, **(LOCAL_RAY_ENV_DEFAULTS if local else {})}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        env_vars = {k: os.environ[k] for k in (*defaults, "MLFLOW_TRACKING_URI", "TRANSFUSION_HOME") if k in os.environ}
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": env_vars},
            "logging_level": logging.WARNING,
            "log_to_driver": bool(os.environ.get("TRANSFUSION_RAY_LOGS")),
            "include_dashboard": False,
        }
        if local:
            # "local": a Ray of our own, never another user's cluster found by process scan.
            kwargs.update(address="local", num_cpus=num_cpus, num_gpus=num_gpus)
        else:
            check_ray_address()  # ray.init would wait minutes for a head that is not there
            kwargs.pop("include_dashboard")
        # ray.init replaces the driver's SIGTERM handler with one that exits on the spot;
        # the driver's own (the CLI's clean shutdown) is kept.
        in_main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if in_main else None
        ray.init(**kwargs)
        if in_main and callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)
    return ray.cluster_resources()


def shutdown_ray() -> None:
    close_pools()
    if ray.is_initialized():
        ray.shutdown()


def kill_local_ray() -> None:
    """An interrupt's last step: kills the local Ray this driver started (GCS, raylet, its
    workers mid-job) outright; a re-run continues each job from its last checkpoint.

    Not ``ray.shutdown()``: a thread still waiting on Ray would then make Ray's core
    worker end this process on the spot, before the caller has finished stopping.
    A cluster at ``$RAY_ADDRESS`` is not this process's to stop.
    """
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and not os.environ.get("RAY_ADDRESS"):
        node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a worker needs, as plain data (it crosses process boundaries)."""

    spec: dict
    run_id: str
    tracking_uri: str
    dataset_root: str
    source_uri: str | None
    # The dataset's published copy for nodes that cannot read ``dataset_root`` (see
    # transfusion.data.node_cache); None when every node shares the driver's disk.
    dataset_uri: str | None = None
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


def process_group_backend(scaling: ScalingConfig) -> str:
    """NCCL for DDP across GPUs; gloo for a one-worker member, whose process group never
    communicates -- so a member also starts where GPUs are declared to Ray but torch sees
    none (``ray start --num-gpus`` on a CPU machine, a node whose driver is broken)."""
    return "nccl" if scaling.use_gpu and (scaling.num_workers or 1) > 1 else "gloo"


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
    from transfusion.data.node_cache import dataset_for_node, weights_for_node
    from transfusion.faults import FaultInjection
    from transfusion.tracking import MlflowHooks, log_provenance, set_tags, test_dataset_of
    from transfusion.train import run_training

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

        loaded = load_state_dict_from_uri(weights_for_node(request.source_uri))
        source_state = loaded.state_dict
        if rank == 0:
            from transfusion.tracking import log_params

            log_params(request.run_id, {"pretrained_sha256": loaded.sha256}, uri=request.tracking_uri)

    dataset = dataset_for_node(request.dataset_root, request.dataset_uri)
    if rank == 0:
        # Which Ray node ran (this attempt of) the job: placement is visible in the runs table.
        set_tags(request.run_id, {"ray_node": ray.get_runtime_context().get_node_id()}, uri=request.tracking_uri)
        # The code and libraries of the node that trains, which may differ from the driver's image.
        log_provenance(request.run_id, uri=request.tracking_uri)
    hooks = MlflowHooks(
        request.run_id,
        uri=request.tracking_uri,
        checkpoint=save_checkpoint,
        test_dataset=test_dataset_of(spec, dataset.meta),
    )
    # The chief's hooks are a context (system metrics while the job runs); other ranks log nothing.
    with contextlib.nullcontext(hooks) if rank else hooks:
        if request.fault_at_step is not None or request.kill_at_step is not None:
            hooks = FaultInjection(hooks, nan_at_step=request.fault_at_step, kill_at_step=request.kill_at_step,
                                   kill_marker=request.kill_marker)  # fmt: skip
        result = run_training(
            spec,
            dataset,
            hooks=hooks,
            source_state=source_state,
            resume=resume,
            prepare_model=ray.train.torch.prepare_model if world_size > 1 else None,
            rank=rank,
            world_size=world_size,
        )
    return {
        "steps": float(result.steps),
        **result.final_metrics,
        "time/setup_s": result.setup_seconds,
        "time/finish_s": result.finish_seconds,
    }


class BrokerGoneError(RuntimeError):
    """The pool was closed under a running member: nobody waits for its results."""


def _from_rank_zero(fetch, *, rank: int, world_size: int):
    """``fetch()`` on rank 0, the same value on every rank (jobs are shared by the group).

    A :class:`BrokerGoneError` on rank 0 is raised on every rank, so the group stops together.
    """
    if world_size == 1:
        return fetch()
    from ray.train.collective import broadcast_from_rank_zero

    value = None
    if rank == 0:
        try:
            value = fetch()
        except BrokerGoneError as exc:
            value = exc
    value = broadcast_from_rank_zero(value)
    if isinstance(value, BrokerGoneError):
        raise value
    return value


def _serve_jobs(config: dict) -> None:
    """Train function of a pool member: runs the broker's jobs until none comes for a while."""
    try:
        _MemberLoop(config["broker"], config["member"], config["storage_path"]).run()
    except BrokerGoneError:
        return


class _MemberLoop:
    """One worker of a pool member: asks the broker for jobs and reports how each ended."""

    def __init__(self, broker, member: int, storage_path: str) -> None:
        context = ray.train.get_context()
        self.broker, self.member, self.storage_path = broker, member, storage_path
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def ask(self, method: str, *args):
        try:
            return ray.get(getattr(self.broker, method).remote(self.member, *args))
        except ray.exceptions.RayActorError as exc:
            raise BrokerGoneError(str(exc)) from exc

    def shared(self, method: str, *args):
        return _from_rank_zero(lambda: self.ask(method, *args), rank=self.rank, world_size=self.world_size)

    def run(self) -> None:
        # After a restart the broker hands back the job this member was running.
        restart = self.shared("resume")
        request = restart.request
        while True:
            gc.collect()  # what the last job left, before the next one allocates
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if request is None:
                request = self.shared("next_job", restart.start)
            if request is None:
                return
            self.run_one(request, restart.start)
            request = None

    def run_one(self, request: dict, start: int) -> None:
        from transfusion.train import NonFiniteLossError

        try:
            result = _run_job(
                LaunchRequest(**request), storage_path=self.storage_path, rank=self.rank, world_size=self.world_size
            )
        except NonFiniteLossError as exc:
            # Deterministic, and seen by every rank together: a restart would diverge again.
            if self.rank == 0:
                self.ask("job_error", start, first_line(exc), False)
            return
        except Exception as exc:
            after = self.ask("job_error", start, first_line(exc), True) if self.rank == 0 else AfterError.RESTART
            if after is AfterError.RESTART or self.world_size > 1:
                raise  # Ray Train restarts the worker group; the job continues from its checkpoint
            return  # the broker failed the job; this process is healthy, so take the next
        if self.rank == 0:
            self.ask("finish", start, result)


@ray.remote(num_cpus=0)
class JobBroker:
    """The Ray actor around :class:`JobBrokerState`: forwards each call and adds the waiting
    (one asyncio loop, so each call is one atomic step of the state)."""

    def __init__(self, *, slots: int, idle_timeout_s: float) -> None:
        self._state = JobBrokerState(slots=slots)
        self._idle_timeout_s = idle_timeout_s
        self._changed = asyncio.Condition()

    async def _changed_now(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def submit(self, request: dict) -> list[int]:
        """Queues a job; returns the members the caller must start for it."""
        started = self._state.submit(request, max_failures=int(request["spec"]["train"]["max_failures"]))
        await self._changed_now()
        return started

    async def result(self, run_id: str) -> JobEnd:
        async with self._changed:
            await self._changed.wait_for(lambda: self._state.outcome(run_id) is not None)
        end = self._state.outcome(run_id)
        self._state.forget(run_id)
        return end

    async def resume(self, member: int) -> Restart:
        restart = self._state.restart(member)
        await self._changed_now()
        return restart

    async def next_job(self, member: int, start: int) -> dict | None:
        """The next queued job for ``member``; None when it is to stop (idle too long, stale, closed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._idle_timeout_s
        async with self._changed:
            while True:
                handout = self._state.take(member, start, idle_expired=loop.time() >= deadline)
                if not handout.waiting:
                    return handout.request
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), deadline - loop.time())

    async def job_error(self, member: int, start: int, reason: str, retryable: bool) -> AfterError:
        after = self._state.job_error(member, start, reason, retryable=retryable)
        await self._changed_now()
        return after

    async def finish(self, member: int, start: int, metrics: dict) -> None:
        self._state.finish(member, start, metrics)
        await self._changed_now()

    async def member_gone(self, member: int, reason: str | None) -> list[int]:
        started = self._state.member_gone(member, reason)
        await self._changed_now()
        return started

    async def set_slots(self, slots: int) -> None:
        self._state.slots = slots

    async def close(self) -> None:
        self._state.close()
        await self._changed_now()


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
        end: JobEnd = ray.get(broker.result.remote(request.run_id))
        if end.failed:
            raise JobFailedError(end.reason)
        return {**end.metrics, "time/launch_s": end.launch_s}

    def _start_members(self, members: list[int]) -> None:
        for member in members:
            thread = threading.Thread(
                target=self._serve_member, args=(member,), name=f"{self.name}-m{member}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve_member(self, member: int) -> None:
        path, filesystem = storage_location(self.storage_path)
        reason = None
        try:
            # Public API only: even one worker gets its (1-rank) process group; members are
            # warm, so that second is paid once per member, not per job.
            trainer = TorchTrainer(
                _serve_jobs,
                train_loop_config={"broker": self._broker, "member": member, "storage_path": self.storage_path},
                scaling_config=self.scaling,
                torch_config=TorchConfig(backend=process_group_backend(self.scaling)),
                run_config=RunConfig(
                    name=f"{self.name}-m{member}",
                    storage_path=path,
                    storage_filesystem=filesystem,
                    failure_config=FailureConfig(max_failures=MEMBER_RESTART_LIMIT),
                ),
            )
            result = trainer.fit()
            if result.error is not None:
                reason = first_line(result.error)
        except Exception as exc:
            reason = first_line(exc)
        if reason:
            log.warning("pool member %s stopped: %s", member, reason)
        try:
            self._start_members(ray.get(self._broker.member_gone.remote(member, reason)))
        except Exception:  # the broker is gone: the pool was closed
            log.debug("broker gone after member %s", member, exc_info=True)

    def close(self, *, timeout: float = 60.0) -> None:
        """Lets idle members finish (up to ``timeout`` s), fails jobs still queued, and stops the broker."""
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


def close_pools(*, wait: bool = True) -> None:
    """Closes this process's pools: no queued job starts; ``wait=False`` waits for no member."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        try:
            pool.close(timeout=60.0 if wait else 0.0)
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


# ============================================================================================
# Representation analysis over Ray (issue 12). Self-contained: the per-item work is the pure
# functions of transfusion.analysis.representations; this section only places them as tasks.
# ============================================================================================


class RayAnalysisExecutor:
    """One Ray task per decomposition, then one per pair, each on a GPU when the cluster has one.

    Activations go to the object store once per representation and decompositions once
    per (run, layer, step); a pair task receives both by reference. At most
    ``groups_in_flight`` groups (model, data size, layer) are submitted at a time, so
    the object store never holds every decomposition of a grid.

    Interpolation between final weights (:meth:`interpolate`) runs the same way: one task per
    pair, each run's weights put in the object store once per cell (model, data size, block
    size), at most ``groups_in_flight`` cells at a time.
    """

    name = "ray"

    def __init__(self, *, groups_in_flight: int = 3) -> None:
        self.groups_in_flight = groups_in_flight

    def _task_options(self) -> dict[str, float]:
        resources = ensure_ray()
        return {"num_cpus": 1, "num_gpus": 1 if resources.get("GPU", 0) >= 1 else 0}

    def _in_flight(self, groups: list, submit) -> list[list]:
        """Each group's task results in order, with at most ``groups_in_flight`` groups submitted at once."""
        out, pending = [], deque()
        for group in groups:
            pending.append(submit(group))
            if len(pending) >= self.groups_in_flight:
                out.append(ray.get(pending.popleft()))
        out.extend(ray.get(refs) for refs in pending)
        return out

    def analyse(self, groups: list, settings) -> list[list]:
        from transfusion.analysis.representations import (
            compare_decompositions,
            decompose_representation,
            load_representation,
        )

        options = self._task_options()
        decompose = ray.remote(decompose_representation).options(**options)
        compare = ray.remote(compare_decompositions).options(**options)

        def submit(group) -> list:
            done = [decompose.remote(*load_representation(item), settings) for item in group.items]
            return [compare.remote(done[i], done[j], measures=m, settings=settings) for i, j, m in group.pairs]

        return self._in_flight(groups, submit)

    def interpolate(self, work: list) -> list:
        from transfusion.analysis.basin import load_final_weights, run_interpolation

        evaluate = ray.remote(run_interpolation).options(**self._task_options())
        cells: dict[tuple, list[int]] = {}
        for index, item in enumerate(work):
            cells.setdefault(item.cell, []).append(index)

        def submit(indices: list[int]) -> list:
            weights: dict = {}
            refs = []
            for i in indices:
                item = work[i]
                for path in (item.first_weights, item.second_weights):
                    if path not in weights:
                        weights[path] = ray.put(load_final_weights(path))
                refs.append(evaluate.remote(item.task, weights[item.first_weights], weights[item.second_weights]))
            return refs

        groups = list(cells.values())
        curves = {i: curve for indices, done in zip(groups, self._in_flight(groups, submit), strict=True)
                  for i, curve in zip(indices, done, strict=True)}  # fmt: skip
        return [curves[i] for i in range(len(work))]
