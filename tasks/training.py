"""Tasks that prepare data, resolve pretrained weights and run training jobs."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.states import Failed, State

from transfusion import tracking
from transfusion.config import GridSpec, JobSpec, WeakSourceSettings
from transfusion.data import DatasetVersion, PreparedDataset, dataset_version, prepare_dataset, transfusion_home
from transfusion.errors import Interrupted, first_line
from transfusion.faults import injected_faults
from transfusion.home import storage_path
from transfusion.job_lease import (
    Claim,
    LeaseKeeper,
    being_claimed,
    claims_in,
    contend,
    held_elsewhere,
    lease_ttl_s,
    new_claim,
)
from transfusion.pretrained import weights_sha256
from transfusion.provenance import code_identity

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    """What happened to one job of a grid."""

    job_key: str
    spec: JobSpec
    status: str  # FINISHED, SKIPPED (finished earlier), ELSEWHERE (another live grid trains it), FAILED, KILLED
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("FINISHED", "SKIPPED", "ELSEWHERE")


class JobSlots:
    """Bounds how many jobs run at once in this process (jobs beyond wait their turn).

    The bound can change while jobs run (another flow of the process configures it):
    running jobs keep their slot, waiting ones see the new bound.
    """

    def __init__(self) -> None:
        self.count = 1
        self._running = 0
        self._changed = threading.Condition()

    def configure(self, count: int) -> None:
        with self._changed:
            self.count = max(1, count)
            self._changed.notify_all()

    def __enter__(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._running < self.count)
            self._running += 1

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify_all()


JOB_SLOTS = JobSlots()


# Flows of one process that started compute and have not stopped it: the warm workers
# they share go when the last one stops.
_COMPUTE_USERS = [0]
_COMPUTE_USERS_LOCK = threading.Lock()


@task(name="start-compute", cache_policy=None)
def start_compute_task(grid: GridSpec, pending: int | None = None) -> int:
    """Starts (or joins) Ray; returns how many of the grid's jobs may run at once.

    On the local Ray that is what its CPUs/GPUs hold. On a remote cluster
    (``$RAY_ADDRESS``) the resources present now are not all there will be: an
    autoscaler adds nodes for demand it sees, so the grid asks for one pool member per
    pending job (up to ``max_concurrent`` when set), Ray queues what does not fit yet, and
    idle members retire so the nodes can go again.

    Jobs then run on warm Ray Train workers shared by every grid of this process
    (:class:`transfusion.launcher.JobPool`) until :func:`stop_compute_task`.
    """
    from transfusion.launcher import ensure_ray

    resources = ensure_ray()
    if os.environ.get("RAY_ADDRESS"):
        demand = pending if pending is not None else len(grid.jobs())
        slots = min(demand, grid.max_concurrent) if grid.max_concurrent else demand
    else:
        slots = int(resources.get("CPU", 1) // grid.train.cpus_per_job)
        if grid.train.gpus_per_job > 0:
            slots = min(slots, int(resources.get("GPU", 0) // grid.train.gpus_per_job))
        if grid.max_concurrent:
            slots = min(slots, grid.max_concurrent)
    slots = max(1, slots)
    JOB_SLOTS.configure(slots)
    with _COMPUTE_USERS_LOCK:
        _COMPUTE_USERS[0] += 1
    return slots


@task(name="stop-compute", cache_policy=None)
def stop_compute_task() -> None:
    """Lets this process's warm Ray Train workers go once no flow uses them (Ray stays up)."""
    from transfusion.launcher import close_pools

    with _COMPUTE_USERS_LOCK:  # held while closing: a flow starting meanwhile waits for it
        _COMPUTE_USERS[0] = max(0, _COMPUTE_USERS[0] - 1)
        if not _COMPUTE_USERS[0]:
            close_pools()


REUSE_WORKERS_ENV = "TRANSFUSION_REUSE_WORKERS"


def reuse_workers() -> bool:
    """Warm workers run job after job unless ``$TRANSFUSION_REUSE_WORKERS=0`` (a fresh Ray Train run each)."""
    return os.environ.get(REUSE_WORKERS_ENV, "1") != "0"


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry what a second try can fix (a network or storage
    error), never a bad setting (ValueError/TypeError name the field to change)."""
    if not state.is_failed():
        return False
    try:
        state.result()
    except (ValueError, TypeError):
        return False
    except Exception:
        return True
    return False


# Run policy where Prefect shows it: a tag concurrency limit on TRAIN_TAG (``prefect
# concurrency-limit create transfusion-train N``) bounds jobs across flows and processes.
TRAIN_TAG = "transfusion-train"


def _check_data_sizes(grid: GridSpec, pool: int) -> None:
    for size in grid.data_sizes:
        if size != "full" and size > pool:
            raise ValueError(f"data_size {size} is larger than the {pool} training images of dataset {grid.dataset!r}")


def _prepare(grid: GridSpec):
    return prepare_dataset(
        grid.dataset, source=grid.dataset_source, resolution=grid.train.resolution, options=grid.dataset_options
    )


def grid_data_version(grid: GridSpec) -> DatasetVersion:
    """The version the grid's prepared data has (or will have), found without reading an image."""
    return dataset_version(
        grid.dataset, source=grid.dataset_source, resolution=grid.train.resolution, options=grid.dataset_options
    )


def check_data_sizes(grid: GridSpec) -> None:
    """Every data size fits the training pool: from the generator's parameters or the prepared
    set where they say it, else by preparing the data (a source-backed set not prepared yet)."""
    if all(size == "full" for size in grid.data_sizes):
        return
    pool = grid_data_version(grid).train_images
    _check_data_sizes(grid, len(_prepare(grid).indices("train")) if pool is None else pool)


@task(name="prepare-dataset", cache_policy=None, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def prepare_dataset_task(grid: GridSpec) -> str:
    """Prepares the grid's dataset once and checks every data size fits its training split."""
    dataset = _prepare(grid)
    _check_data_sizes(grid, len(dataset.indices("train")))
    return str(dataset.root)


def identify_jobs(grid: GridSpec, source_uris: Mapping[tuple[str, str], str | None]) -> list[JobSpec]:
    """The grid's jobs with what they read by content: the data's version, the weights' sha256, the code.

    ``source_uris`` maps each (model, pretrained) of the grid to its resolved URI (None:
    it could not be resolved; its jobs keep the source's name in their key and fail when
    they run, saying why). Nothing here reads an image.
    """
    version = grid_data_version(grid).version
    code = code_identity(grid.identity.code)
    sha256 = {}
    for pair, uri in source_uris.items():
        if uri is None:
            continue
        try:
            sha256[pair] = weights_sha256(uri)
        except Exception as exc:  # the job reports it when it loads the weights
            log.warning("weights of %s for %s not hashed (%s): keyed by the source's name", pair[1], pair[0], exc)
    return [
        job.model_copy(
            update={
                "data_version": version,
                "weights_sha256": sha256.get((job.model, job.pretrained)) if job.pretrained else None,
                "code_version": code,
            }
        )
        for job in grid.jobs()
    ]


@task(name="identify-jobs", cache_policy=None, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def identify_jobs_task(grid: GridSpec, source_uris: list[tuple[str, str, str | None]]) -> list[JobSpec]:
    """:func:`identify_jobs` with the resolved sources as (model, pretrained, URI or None) rows."""
    return identify_jobs(grid, {(model, pretrained): uri for model, pretrained, uri in source_uris})


@task(name="preflight", cache_policy=None)
def preflight_task(grid: GridSpec) -> None:
    """Fails fast, before any run exists, when a service the grid needs is unreachable."""
    from transfusion.preflight import (
        check_pretrained_sources,
        check_ray_address,
        check_storage_path,
        check_tracking_server,
    )

    check_tracking_server(tracking.tracking_uri())
    check_storage_path(storage_path())
    check_ray_address()
    check_pretrained_sources(grid.sources)


@task(name="pending-jobs", cache_policy=None)
def pending_jobs_task(
    grid: GridSpec,
    grid_run: tracking.GridRun,
    jobs: list[JobSpec] | None = None,
    retrain: frozenset[str] = frozenset(),
) -> int:
    """How many jobs have no finished run that counts (:func:`transfusion.identity.match_finished_runs`)
    or are to retrain (their ``job_key`` in ``retrain``); 0: nothing to train.

    ``jobs``: the grid's identified jobs (default ``grid.jobs()``, matched by key alone).
    """
    matches = tracking.match_job_runs(grid_run.experiment_id, jobs if jobs is not None else grid.jobs())
    for match in matches:
        for reason in match.reasons():
            log.info("%s: %s", match.job.run_name, reason)
    return sum(match.run is None or match.job.job_key in retrain for match in matches)


def identified_jobs(grid: GridSpec) -> list[JobSpec]:
    """The grid's jobs identified by what they read, for an analysis: sources are looked up, never pretrained."""
    from tasks.sources import existing_source_uri

    pairs = dict.fromkeys((s.model, s.pretrained) for s in grid.jobs() if s.pretrained)
    return identify_jobs(grid, {(model, source): existing_source_uri(model, source) for model, source in pairs})


@task(name="unchanged-since", cache_policy=None)
def unchanged_since_task(grid: GridSpec) -> str | None:
    """``0 pending: nothing changed since <date>`` when every job of ``grid`` has a counted
    FINISHED run (one MLflow query, nothing started); None when there is work to do."""
    from transfusion.grid_status import JobState, grid_status
    from transfusion.plan import since

    status = grid_status(grid.name, identified_jobs(grid), tracking.grid_job_runs(grid.name))
    if status.count(JobState.FINISHED) < len(status.jobs):
        return None
    return f"0 pending: nothing changed since {since(status.last_finished_ms)}"


@task(name="open-grid-run", cache_policy=None)
def open_grid_run_task(grid: GridSpec) -> tracking.GridRun:
    return tracking.open_grid_run(grid)


# Job runs this process opened and has not ended, with the interruptions each had
# before: an interrupt ends them all KILLED while the tracking server still answers.
_OPEN_RUNS: dict[str, int] = {}
_OPEN_RUNS_LOCK = threading.Lock()
# The interrupt this process is stopping for (None while it runs normally).
_INTERRUPT: list[BaseException | None] = [None]
INTERRUPTIONS_TAG = "interruptions"


# Called once with the interrupt when this process starts stopping for one (the CLI
# quiets its logs and arms its watchdog: Prefect may have caught the signal first).
INTERRUPT_LISTENERS: list = []


def interrupting() -> BaseException | None:
    return _INTERRUPT[0]


def clear_interrupt() -> None:
    """A new grid of this process starts: an earlier flow's interrupt is not its own."""
    _INTERRUPT[0] = None


def interrupt_open_runs(exc: BaseException) -> int:
    """Ends every job run this process has open KILLED with ``exc``'s reason; returns how many.

    Jobs finishing meanwhile are not reported FAILED for the errors the interrupt causes
    (their workers go with Ray), and the next grid run continues each from its last checkpoint.
    """
    first = _INTERRUPT[0] is None
    _INTERRUPT[0] = exc
    for listener in list(INTERRUPT_LISTENERS) if first else []:
        listener(exc)
    with _OPEN_RUNS_LOCK:
        runs = dict(_OPEN_RUNS)
        _OPEN_RUNS.clear()
    for run_id, interruptions in runs.items():
        try:
            tracking.set_tags(run_id, {INTERRUPTIONS_TAG: str(interruptions + 1)})
            tracking.end_run(run_id, "KILLED", reason=failure_reason(exc))
        except Exception:
            log.debug("could not mark run %s KILLED", run_id, exc_info=True)
    return len(runs)


def _resume_candidate(experiment_id: str, spec: JobSpec):
    """An earlier unfinished run of this job to continue, so a re-run adds no duplicate."""
    for run in tracking.find_job_runs(experiment_id, spec.job_key):
        if run.info.status in ("RUNNING", "FAILED", "KILLED", "SCHEDULED"):
            return run
    return None


# Where a job's time goes besides training (logged with time/total_s): waiting for a
# worker (seconds only when one had to start), model build + step-0 evaluation, final
# evaluation + uploads.
JOB_TIMINGS = ("time/launch_s", "time/setup_s", "time/finish_s")


def job_task_options(spec: JobSpec) -> dict:
    """Task-run name and tags saying which cell and seed a training task run is (Prefect UI filters by tag).

    ``TRAIN_TAG`` stays among them: its tag concurrency limit is the grid's run policy.
    """
    source = [f"source:{spec.source_label}"] if spec.source_label else []
    return {
        "task_run_name": f"train-{spec.run_name}",
        "tags": [TRAIN_TAG, f"model:{spec.model}", f"init:{spec.init_label}", f"data_size:{spec.data_size}",
                 f"seed:{spec.seed}", *source],
    }  # fmt: skip


# How often a job another grid holds is looked at again.
LEASE_POLL_S = 3.0


def _wait_while_held_elsewhere(spec: JobSpec, claims: tracking.JobClaims) -> Claim | None:
    """Waits while another live grid holds the job's lease; the claim it waited for (None: none held it)."""
    waited_for = None
    while interrupting() is None and (other := held_elsewhere(claims.claims(), time.time())) is not None:
        if waited_for is None or other.claim_id != waited_for.claim_id:
            log.info("job %s: being trained by %s; waiting for it", spec.run_name, other.holder)
        waited_for = other
        time.sleep(LEASE_POLL_S)
    return waited_for


@dataclass(frozen=True)
class ClaimedRun:
    """The MLflow run a job trains in, with the lease this grid won on it."""

    run_id: str
    previous: Any  # the unfinished run continued (an MLflow Run), or None for a new run
    attempt: int
    claims: tracking.JobClaims
    claim: Claim
    ttl: float


def _claim_job_run(
    spec: JobSpec, grid_run: tracking.GridRun, claims: tracking.JobClaims, max_retries: int
) -> ClaimedRun | JobOutcome | None:
    """The run to train the job in, with its lease won; a FAILED outcome when its retries are spent;
    None when another grid claimed it first (a new run made for the claim is deleted) or is about to."""
    ttl = lease_ttl_s()
    previous = _resume_candidate(grid_run.experiment_id, spec)
    if previous is not None and being_claimed(
        status=previous.info.status, started_at=previous.info.start_time / 1000,
        claims=claims_in(previous.info.run_id, previous.data.tags), now=time.time(), ttl=ttl,
    ):  # fmt: skip
        return None
    if previous is None:
        run_id = tracking.create_job_run(spec, experiment_id=grid_run.experiment_id, parent_run_id=grid_run.run_id)
        attempt = 1
    else:
        run_id = previous.info.run_id
        # A RUNNING run whose lease lapsed was left by a dead process: also a new attempt.
        attempt = int(previous.data.tags.get("attempts", "1")) + 1
        # Attempts an interrupt ended are not failures of the job: they do not count against max_retries.
        interruptions = int(previous.data.tags.get(INTERRUPTIONS_TAG, "0"))
        if previous.info.status == "FAILED" and attempt - interruptions > 1 + max_retries:
            reason = previous.data.tags.get(tracking.REASON_TAG, "failed")
            return JobOutcome(
                spec.job_key, spec, "FAILED", run_id, reason=f"gave up after {attempt - 1} attempts: {reason}"
            )
    if previous is not None:
        tracking.reopen_run(run_id)  # claims count on RUNNING runs only: reopened before claiming
    claim = new_claim(run_id, grid_run_id=grid_run.run_id, now=time.time(), ttl=ttl)
    contest = contend(claims, claim)
    if not contest.won:
        if previous is None and contest.holder.run_id != run_id:  # a winner that took over this new run trains in it
            tracking.delete_run(run_id)
        return None
    return ClaimedRun(run_id, previous, attempt, claims, contest.mine, ttl)


@task(name="train-job", cache_policy=None, tags=[TRAIN_TAG], task_run_name="train-{spec.run_name}")
def train_job_task(
    spec: JobSpec,
    grid_run: tracking.GridRun,
    dataset_root: str,
    source_uri: str | None = None,
    max_retries: int = 1,
    weak_source: WeakSourceSettings | None = None,
    retrain: bool = False,
) -> JobOutcome | State:
    """One job (:func:`run_job`); a job that failed ends this task run Failed, its outcome as the
    state's data, so the Prefect UI shows it and the flow still collects it and carries on."""
    outcome = run_job(spec, grid_run, dataset_root, source_uri, max_retries, weak_source, retrain)
    if outcome.status == "FAILED":
        return Failed(message=f"{spec.run_name}: {outcome.reason}", data=outcome)
    return outcome


def run_job(
    spec: JobSpec,
    grid_run: tracking.GridRun,
    dataset_root: str,
    source_uri: str | None = None,
    max_retries: int = 1,
    weak_source: WeakSourceSettings | None = None,
    retrain: bool = False,
) -> JobOutcome:
    """Runs one job through Ray Train as one MLflow child run; never raises for job failures.

    A finished run that counts for the job (:func:`transfusion.identity.match_finished_runs`)
    makes it SKIPPED, unless ``retrain``: then a new run trains and, once it finishes, the
    runs it replaces are kept and tagged ``superseded_by`` with its id.

    A job another live grid holds the lease of (:mod:`transfusion.job_lease`) is waited
    for, not trained twice: ELSEWHERE once that grid finished it, trained here if it
    did not (its holder died or the job failed there).
    """
    claims = tracking.JobClaims(grid_run.experiment_id, spec.job_key)
    waited_for: Claim | None = None
    while True:
        waited_for = _wait_while_held_elsewhere(spec, claims) or waited_for
        (match,) = tracking.match_job_runs(grid_run.experiment_id, [spec])
        replaced = [run.run_id for run in match.counted] if retrain else []
        if match.run is not None and (not retrain or waited_for is not None):
            done = tracking.client().get_run(match.run.run_id)
            if waited_for is None:
                return JobOutcome(spec.job_key, spec, "SKIPPED", done.info.run_id, dict(done.data.metrics))
            return JobOutcome(spec.job_key, spec, "ELSEWHERE", done.info.run_id, dict(done.data.metrics),
                              reason=f"trained by {waited_for.holder}")  # fmt: skip
        with JOB_SLOTS:
            if interrupting() is not None:  # queued behind the slots when the interrupt came: never started
                return JobOutcome(spec.job_key, spec, "KILLED", None, reason=failure_reason(interrupting()))
            started = time.perf_counter()
            claimed = _claim_job_run(spec, grid_run, claims, max_retries)
            if isinstance(claimed, JobOutcome):
                return claimed
            if claimed is not None:
                return _train_claimed(spec, grid_run, claimed, dataset_root, source_uri, weak_source,
                                      replaced=replaced, started=started)  # fmt: skip
        # Another grid claimed it at the same moment, first, or is claiming it: wait (out of the slot), look again.
        time.sleep(LEASE_POLL_S)


def _train_claimed(
    spec: JobSpec,
    grid_run: tracking.GridRun,
    claimed: ClaimedRun,
    dataset_root: str,
    source_uri: str | None,
    weak_source: WeakSourceSettings | None,
    *,
    replaced: list[str],
    started: float,
) -> JobOutcome:
    """Trains a job whose run this grid holds the lease of, renewing it until the run ends."""
    from transfusion.data.node_cache import for_workers
    from transfusion.launcher import LaunchRequest, fit_job, shared_pool

    run_id, previous = claimed.run_id, claimed.previous
    with _OPEN_RUNS_LOCK:
        _OPEN_RUNS[run_id] = 0 if previous is None else int(previous.data.tags.get(INTERRUPTIONS_TAG, "0"))
    with LeaseKeeper(claimed.claims, claimed.claim, ttl=claimed.ttl):  # renewed while it trains, dropped at the end
        try:
            tracking.set_tags(run_id, {"attempts": str(claimed.attempt)})
            data_meta = PreparedDataset.open(dataset_root).meta
            if spec.data_version is not None and data_meta.get("version") != spec.data_version:
                # The data changed between identifying the job and preparing it: the run says which it read.
                log.warning("job %s: data version %s, identified as %s", spec.job_key, data_meta.get("version"),
                            spec.data_version)  # fmt: skip
            data_params = {"data_version": data_meta.get("version", ""),
                           "data_skipped": data_meta.get("skipped", 0)}  # fmt: skip
            if source_uri:
                data_params["pretrained_uri"] = source_uri
                # The source's accuracy and provenance, so a transfer run says how good its weights were.
                from tasks.sources import source_quality, source_tags

                quality = source_quality(source_uri)
                tracking.set_tags(run_id, source_tags(source_uri, quality, weak_source or WeakSourceSettings()))
            tracking.log_params(run_id, data_params)
            tracking.log_dataset_inputs(run_id, spec, data_meta, source_uri=spec.dataset_source or dataset_root)
            dataset_uri, worker_source_uri = for_workers(dataset_root, source_uri)
            request = LaunchRequest(
                spec=spec.model_dump(mode="json"),
                run_id=run_id,
                tracking_uri=tracking.tracking_uri(),
                dataset_root=dataset_root,
                source_uri=worker_source_uri,
                dataset_uri=dataset_uri,
                **injected_faults(spec, marker_dir=transfusion_home() / "faults"),
            )
            try:
                if reuse_workers():
                    pool = shared_pool(spec, storage_path=storage_path(), slots=JOB_SLOTS.count)
                    metrics = pool.run(request)
                else:
                    metrics = fit_job(request, storage_path=storage_path())
            except Exception as exc:  # the grid carries on; the run says why it failed
                if interrupting() is not None:  # its workers went with the interrupt; the run is ended KILLED
                    return JobOutcome(spec.job_key, spec, "KILLED", run_id, reason=failure_reason(interrupting()))
                reason = first_line(exc)
                log.error("job %s failed: %s", spec.job_key, reason)
                try:
                    tracking.end_run(run_id, "FAILED", reason=reason)
                except Exception:
                    log.exception("could not mark run %s FAILED", run_id)
                return JobOutcome(
                    spec.job_key, spec, "FAILED", run_id, reason=reason, seconds=time.perf_counter() - started
                )
            total = time.perf_counter() - started
            timings = {k: v for k, v in metrics.items() if k in JOB_TIMINGS}
            timings[tracking.DEVICE_SECONDS] = total * devices_held(spec)
            tracking.log_metrics(run_id, {"time/total_s": total, **timings}, step=int(metrics.get("steps", 0)))
            tracking.end_run(run_id, "FINISHED")
            tracking.supersede(replaced, run_id)
            metrics = {**metrics, tracking.DEVICE_SECONDS: timings[tracking.DEVICE_SECONDS]}
            return JobOutcome(spec.job_key, spec, "FINISHED", run_id, metrics, seconds=total)
        except BaseException as exc:  # an interrupt, or tracking failing outside the job: no run stays RUNNING
            with _OPEN_RUNS_LOCK:
                still_open = _OPEN_RUNS.pop(run_id, None) is not None
            if still_open:
                end_failed_run(run_id, interrupting() or exc)
            raise
        finally:
            with _OPEN_RUNS_LOCK:
                _OPEN_RUNS.pop(run_id, None)


def failure_reason(exc: BaseException) -> str:
    """The ``failure_reason`` tag of a run stopped by ``exc``: its type and first line
    (``interrupted by SIGINT`` / ``interrupted by SIGTERM`` for a signal)."""
    if isinstance(exc, Interrupted):
        return str(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")[:500]


def interrupt_of(exc: BaseException) -> Interrupted | None:
    """The signal interrupt ``exc`` stands for, if any: Ctrl-C, or SIGTERM as Prefect raises it in a flow."""
    import signal

    from prefect.exceptions import TerminationSignal

    if isinstance(exc, Interrupted):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(signal.SIGINT, delivered=False)
    if isinstance(exc, TerminationSignal):
        return Interrupted(exc.signal)
    return None


def end_failed_run(run_id: str, exc: BaseException) -> None:
    """Ends a run stopped by ``exc``: KILLED for an interrupt, FAILED otherwise, with the reason.

    Never raises: the caller re-raises ``exc``, whose message matters more than this one.
    """
    interrupt = interrupt_of(exc)
    interrupted = interrupt is not None or isinstance(exc, SystemExit)
    if interrupt is not None:  # a flow stopping for a signal: its jobs' runs go with it
        interrupt_open_runs(interrupt)
    try:
        tracking.end_run(run_id, "KILLED" if interrupted else "FAILED", reason=failure_reason(interrupt or exc))
    except Exception:
        log.exception("could not end run %s", run_id)


def devices_held(spec: JobSpec) -> float:
    """Devices a job holds while it runs: its GPUs, or its CPUs when it has none (x workers)."""
    t = spec.train
    return (t.gpus_per_job or t.cpus_per_job) * t.num_workers


@task(name="finish-grid-run", cache_policy=None)
def finish_grid_run_task(grid_run: tracking.GridRun, outcomes: list[JobOutcome]) -> None:
    failed = any(o.status == "FAILED" for o in outcomes)
    # What the grid's finished jobs held, this run's and earlier ones' (runs from before the
    # metric existed add nothing): the figure ``transfusion plan`` sets beside its estimate.
    spent = sum(o.metrics.get(tracking.DEVICE_SECONDS, 0.0) for o in outcomes if o.ok)
    if outcomes:
        tracking.log_metrics(grid_run.run_id, {tracking.DEVICE_SECONDS: spent}, step=0)
    tracking.end_run(grid_run.run_id, "FAILED" if failed else "FINISHED")
