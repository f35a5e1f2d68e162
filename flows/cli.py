"""The ``transfusion`` command line.

transfusion run demo                  # a preset grid
transfusion run my-grid.yaml --set train.steps=500
transfusion ui                        # MLflow UI on the local store
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
import webbrowser
from pathlib import Path

import yaml

# Quiet third-party chatter (and telemetry calls out of a closed network) before Prefect,
# MLflow and Ray are imported; a variable the user set wins.
QUIET_ENV = {
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_LOG_PRINTS": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary Prefect server's 20 s start limit fails a grid on a busy machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "RAY_DEDUP_LOGS": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TQDM_DISABLE": "1",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow's INFO lines ("Waiting up to 300 seconds for model version to finish creation").
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DO_NOT_TRACK": "1",
}
# Levels of the quiet environment that --verbose lifts (unless the user set them).
VERBOSE_ENV = {"PREFECT_LOGGING_LEVEL": "INFO", "MLFLOW_LOGGING_LEVEL": "INFO"}
# Loggers whose warnings tell a user of this tool nothing they can act on.
QUIET_LOGGERS = {
    # Local Ray clusters use token auth by default; the warning announces it on every start.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}
_SET_HERE = {key for key in QUIET_ENV if key not in os.environ}
for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)


def configure_logging(*, verbose: bool) -> None:
    """WARNING and up from everyone, minus known noise; everything at INFO with ``--verbose``."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        for key, value in VERBOSE_ENV.items():
            if key in _SET_HERE:
                os.environ[key] = value
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``train.steps=10`` style overrides onto a grid mapping (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target[part] = dict(target.get(part) or {})
            target = target[part]
        target[parts[-1]] = yaml.safe_load(raw)
    return data


def load_grid_with_overrides(ref: str, overrides: list[str]):
    from transfusion.config import GridSpec, load_grid

    grid = load_grid(ref)
    if overrides:
        grid = load_grid(apply_overrides(grid.model_dump(mode="json"), overrides))
    return GridSpec.model_validate(grid.model_dump(mode="json"))


@contextlib.contextmanager
def progress_display():
    """Live progress of the grid's jobs on stderr: a rich table on a terminal, plain lines elsewhere."""
    from transfusion.progress import LogLines, add_listener, remove_listener

    if sys.stderr.isatty():
        listener = RichProgress()
    else:
        listener = LogLines(lambda line: print(line, file=sys.stderr, flush=True))
    add_listener(listener)
    try:
        yield
    finally:
        remove_listener(listener)
        if isinstance(listener, RichProgress):
            listener.close()


class RichProgress:
    """A live table of the running jobs (step/steps, val AUC, speed) under the finished-job lines."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self._live = None
        self._lock = threading.Lock()  # the flow's thread and the progress poller both call in

    def _table(self, progress):
        from rich.table import Table

        from transfusion.progress import format_seconds

        eta = format_seconds(progress.eta_seconds())
        table = Table(
            title=f"grid {progress.grid}: {progress.finished}/{len(progress.jobs)} jobs done, ETA {eta}",
            title_justify="left",
            box=None,
        )
        for column in ("job", "step", "val/auc", "steps/s"):
            table.add_column(column, justify="left" if column == "job" else "right")
        for job in progress.running:
            auc = "" if job.val_auc != job.val_auc else f"{job.val_auc:.3f}"
            speed = "" if job.steps_per_s != job.steps_per_s else f"{job.steps_per_s:.2f}"
            table.add_row(job.name, f"{job.step}/{job.steps}", auc, speed)
        return table

    def changed(self, progress) -> None:
        from rich.live import Live

        with self._lock:
            if self._live is None:
                self._live = Live(self._table(progress), console=self.console, refresh_per_second=2, transient=True)
                self._live.start()
            else:
                self._live.update(self._table(progress))

    def announce(self, progress, line: str) -> None:
        self.console.print(line, highlight=False, markup=False)
        self.changed(progress)

    def close(self) -> None:
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None


def command_run(args: argparse.Namespace) -> int:
    from tasks.training import prepare_dataset_task

    grid = load_grid_with_overrides(args.grid, args.set)
    # Check the data sizes against the prepared data before any service starts.
    prepare_dataset_task.fn(grid)
    from flows.grid import transfusion

    started = time.perf_counter()
    with progress_display():
        summary = transfusion(grid)
    elapsed = time.perf_counter() - started
    print()
    print(f"Grid {summary.grid}: {summary.finished} trained, {summary.skipped} already done, "
          f"{len(summary.failed)} failed, in {elapsed:.0f} s")  # fmt: skip
    print()
    print(summary.table_markdown)
    if summary.similarity_markdown.strip():
        print("Top-layer SVCCA similarity between seeds:")
        print(summary.similarity_markdown)
    for line in summary.failed:
        print(f"FAILED: {line}")
    home = os.environ.get("TRANSFUSION_HOME", ".transfusion")
    print(f"Runs: MLflow experiment {summary.grid!r} (parent run {summary.parent_run_id}); "
          f"tables and plots are artifacts of the parent run under tables/.")  # fmt: skip
    if summary.report_dir:
        print(f"Report: {Path(summary.report_dir) / 'report.html'}")
    print(f"Browse them with: transfusion ui   (store: {Path(home).resolve()})")
    return 1 if summary.failed else 0


def command_ui(args: argparse.Namespace) -> int:
    from transfusion.data import transfusion_home
    from transfusion.services import start_mlflow_server
    from transfusion.tracking import experiment_page_url, last_grid_experiment

    server = start_mlflow_server(transfusion_home(), host=args.host, port=args.port)
    experiment_id = last_grid_experiment(uri=server.url)
    url = experiment_page_url(server.url, experiment_id) if experiment_id else server.url
    print(f"MLflow UI at {url}  (the last grid's runs; Ctrl-C to stop)", flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def command_analyze(args: argparse.Namespace) -> int:
    grid = load_grid_with_overrides(args.grid, args.set)
    from flows.grid import transfusion

    out = str(Path(args.out).resolve()) if getattr(args, "out", None) else None
    summary = transfusion(grid, stage="analysis", report_dir=out)
    print(summary.table_markdown)
    print(
        f"Report: {Path(summary.report_dir) / 'report.html'} (also under report/ of parent run {summary.parent_run_id})"
    )
    return 0


def command_pretrain(args: argparse.Namespace) -> int:
    from transfusion.models import MODELS

    MODELS.get(args.model)  # one clear line for an unknown name, before anything starts
    from flows.pretrain import pretrain

    uri = pretrain(model=args.model, source=args.source, steps=args.steps, resolution=args.resolution, seed=args.seed)
    print(f"registered {uri}")
    return 0


def command_list(args: argparse.Namespace) -> int:
    from transfusion.data import list_datasets
    from transfusion.inits import list_inits
    from transfusion.models import list_models
    from transfusion.presets import PRESETS

    print("grid presets:", ", ".join(PRESETS.names()))
    print("models:      ", ", ".join(list_models()))
    print("inits:       ", ", ".join(list_inits()))
    print("datasets:    ", ", ".join(list_datasets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfusion", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a grid (preset name or YAML/JSON file)")
    run.add_argument("grid", help="preset name (demo, smoke, ...) or path to a grid file")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a grid field, e.g. train.steps=50"
    )
    run.set_defaults(func=command_run)

    ui = sub.add_parser("ui", help="serve the MLflow UI on the local store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--open", action="store_true", help="open the page in a web browser")
    ui.set_defaults(func=command_ui)

    ana = sub.add_parser("analyze", help="re-run the analyses of a trained grid from its stored artifacts")
    ana.add_argument("grid")
    ana.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ana.set_defaults(func=command_analyze)

    rep = sub.add_parser("report", help="write a trained grid's report (Markdown + self-contained HTML)")
    rep.add_argument("grid")
    rep.add_argument("--out", required=True, help="directory for report.md, report.html, tables and figures")
    rep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rep.set_defaults(func=command_analyze)

    pre = sub.add_parser("pretrain", help="pretrain a model on a source set and register it in MLflow")
    pre.add_argument("--model", required=True)
    pre.add_argument("--source", default="synthetic", help="'synthetic' or an ImageNet-style folder path / s3:// URI")
    pre.add_argument("--steps", type=int, default=150)
    pre.add_argument("--resolution", type=int, default=40)
    pre.add_argument("--seed", type=int, default=0)
    pre.set_defaults(func=command_pretrain)

    from flows.data_cli import add_data_commands
    from flows.stack import add_stack_commands

    add_stack_commands(sub)
    add_data_commands(sub)

    lst = sub.add_parser("list", help="list presets, models, inits and datasets")
    lst.set_defaults(func=command_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"transfusion: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transfusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
