"""``transfusion plan``, ``status`` and ``export``: what a grid will cost, where its jobs stand, its runs as a table.

None of them starts Ray, Prefect or a dataset preparation. ``plan`` asks MLflow only
when a tracking store is there to ask (``$MLFLOW_TRACKING_URI`` answering, or the local
store under ``TRANSFUSION_HOME`` a grid run here wrote); ``status`` and ``export`` need one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.arguments import warn_gpus_left_idle

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("csv", "parquet")


@dataclass(frozen=True)
class TrackingStore:
    """Where the grid's runs are read from (``uri`` None: nowhere, ``note`` says why)."""

    uri: str | None
    note: str = ""


@contextlib.contextmanager
def tracking_store(*, required: bool) -> Iterator[TrackingStore]:
    """The configured tracking server if it answers, else the local store (its server started for the
    block) if a grid ran here; ``required`` turns "none" into an error."""
    from transfusion.data import transfusion_home
    from transfusion.preflight import check_tracking_server

    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        try:
            check_tracking_server(configured, timeout=3.0)
        except RuntimeError as exc:
            if required:
                raise
            yield TrackingStore(None, str(exc))
            return
        yield TrackingStore(configured)
        return
    home = transfusion_home()
    if not (home / "mlflow.db").is_file():
        if required:
            raise ValueError(
                f"no tracking store: MLFLOW_TRACKING_URI is not set and no grid has run under {home} "
                "(set TRANSFUSION_HOME or MLFLOW_TRACKING_URI)"
            )
        yield TrackingStore(None, "no tracking server")
        return
    from flows.runtime import tracking_service

    with tracking_service(home) as uri:
        yield TrackingStore(uri)


def check_grid_arguments(args: argparse.Namespace) -> None:
    """GRID (with ``--set``/``--name``) or ``--run-id``: exactly one, refused before any store is opened."""
    if getattr(args, "run_id", None):
        if args.grid or args.set or getattr(args, "name", None):
            raise ValueError("--run-id names the grid already: give it without GRID, --set or --name")
    elif not args.grid:
        raise ValueError("name a grid (a preset or a grid file) or a parent run with --run-id")


def grid_from_args(args: argparse.Namespace, *, store: TrackingStore | None = None, extra: list[str] | None = None):
    """The grid a command names: ``--run-id`` (its parent run's grid) or GRID with ``--set``/``--name``."""
    from flows.arguments import load_grid_with_overrides
    from transfusion.config import load_grid

    check_grid_arguments(args)
    run_id = getattr(args, "run_id", None)
    if run_id:
        if store is None or store.uri is None:
            raise ValueError(f"--run-id {run_id}: no tracking store to read it from ({store.note if store else ''})")
        from transfusion.tracking import grid_of_run

        grid = load_grid(grid_of_run(run_id, uri=store.uri))
        if extra:
            grid = load_grid_with_overrides(grid.model_dump(mode="json"), extra, name=grid.name, announce=False)
        return grid
    return load_grid_with_overrides(args.grid, args.set + (extra or []), name=getattr(args, "name", None))


def grid_status_from(grid, store: TrackingStore):
    """Where each job of ``grid`` stands in ``store`` (None: no store to ask)."""
    if store.uri is None:
        return None
    from tasks.training import identified_jobs
    from transfusion.grid_status import grid_status
    from transfusion.tracking import grid_job_runs

    try:
        jobs = identified_jobs(grid)  # the keys runs carry: by the data's version and the weights' sha256
    except (OSError, ValueError) as exc:  # a source not reachable from here: matched by names only
        log.info("jobs matched by names (%s)", exc)
        jobs = grid.jobs()
    return grid_status(grid.name, jobs, grid_job_runs(grid.name, uri=store.uri))


def print_plan(grid, *, device: str | None, price_per_hour: float | None) -> None:
    from transfusion.data import transfusion_home
    from transfusion.plan import format_plan, local_device, plan_grid

    with tracking_store(required=False) as store:
        status = grid_status_from(grid, store)
    plan = plan_grid(
        grid,
        device=device or local_device(),
        price_per_hour=price_per_hour,
        status=status,
        status_note=store.note,
        home=transfusion_home(),
    )
    print(format_plan(plan), flush=True)


def command_plan(args: argparse.Namespace) -> int:
    check_grid_arguments(args)
    with tracking_store(required=False) if args.run_id else contextlib.nullcontext() as store:
        grid = grid_from_args(args, store=store)
    warn_gpus_left_idle(grid)
    print_plan(grid, device=args.gpu, price_per_hour=args.price_per_hour)
    return 0


def command_status(args: argparse.Namespace) -> int:
    from transfusion.grid_status import JobState
    from transfusion.plan import since

    check_grid_arguments(args)
    with tracking_store(required=True) as store:
        grid = grid_from_args(args, store=store)
        status = grid_status_from(grid, store)
    print(f"Grid {grid.name} ({store.uri}): {status.counts_line}")
    for state in (JobState.RUNNING, JobState.FAILED, JobState.PENDING, JobState.FINISHED):
        jobs = status.of(state)
        if not jobs:
            continue
        print(f"{state.value} ({len(jobs)}):")
        for job in jobs:
            print(f"  {job.spec.run_name}  [{job.spec.job_key}]  {job.reason}")
    if status.count(JobState.FINISHED):
        print(f"last job finished: {since(status.last_finished_ms)}")
    return 0


def export_path(text: str, fmt: str) -> Path:
    """``--out`` as a file this process can write (its folder created), with the format's suffix."""
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        raise ValueError(f"--out {text} is a directory; name a file, e.g. {Path(text) / f'runs.{fmt}'}")
    if path.suffix.lower() != f".{fmt}":
        raise ValueError(f"--out {text}: a --format {fmt} file ends in .{fmt}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {text}: cannot create its folder ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"--out {text}: the folder is not writable")
    return path


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def command_export(args: argparse.Namespace) -> int:
    from transfusion.tracking import runs_frame

    if args.format == "parquet" and not parquet_available():
        raise ValueError("--format parquet needs pyarrow, which is not installed here; use --format csv")
    check_grid_arguments(args)
    out = export_path(args.out, args.format)
    with tracking_store(required=True) as store:
        grid = grid_from_args(args, store=store)
        frame = runs_frame(grid.name, uri=store.uri)
    if frame.empty:
        raise ValueError(f"grid {grid.name} has no runs in the tracking store {store.uri}; nothing to export")
    if args.format == "csv":
        frame.to_csv(out, index=False)
    else:
        # Parquet wants one type per column: MLflow's tags and params are text already, times are timestamps.
        frame.to_parquet(out, index=False)
    print(f"{len(frame)} runs of grid {grid.name}, {len(frame.columns)} columns -> {out}")
    return 0


def _add_grid_arguments(parser: argparse.ArgumentParser, *, run_id: bool) -> None:
    parser.add_argument("grid", nargs="?" if run_id else None, help="preset name or path to a grid file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a grid field, e.g. train.steps=50"
    )
    add_name_argument(parser)
    if run_id:
        add_run_id_argument(parser)


def add_name_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        default=None,
        help="the grid's name (its MLflow experiment); default with --set: <grid>+<hash of the overrides>",
    )


def add_run_id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-id", default=None, metavar="RUN", help="the grid of this parent run (grid-<name>), instead of GRID"
    )


def device_name(text: str) -> str:
    from transfusion.plan import DEVICES

    if text not in DEVICES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DEVICES)}, got {text!r}")
    return text


def add_plan_commands(sub: argparse._SubParsersAction) -> None:
    from flows.arguments import non_negative_float

    plan = sub.add_parser(
        "plan", help="what a grid will cost (jobs, FLOPs, device hours, disk, price), starting nothing"
    )
    _add_grid_arguments(plan, run_id=True)
    plan.add_argument(
        "--gpu",
        type=device_name,
        default=None,
        metavar="DEVICE",
        help="price on a100, h100, l4, a10g or cpu (default: this machine's)",
    )
    plan.add_argument(
        "--price-per-hour",
        type=non_negative_float,
        default=None,
        metavar="USD",
        help="price of one device-hour (a GPU, or a CPU core), instead of the default list price",
    )
    plan.set_defaults(func=command_plan)

    status = sub.add_parser("status", help="finished / running / pending / failed jobs of a grid, from MLflow")
    _add_grid_arguments(status, run_id=True)
    status.set_defaults(func=command_status)

    export = sub.add_parser("export", help="a grid's runs as one table: every identity field, metric and tag")
    _add_grid_arguments(export, run_id=True)
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="csv, or parquet (needs pyarrow)")
    export.add_argument("--out", required=True, metavar="FILE", help="file to write (.csv or .parquet)")
    export.set_defaults(func=command_export)
