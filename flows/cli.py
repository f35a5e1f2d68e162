"""The transfusion command line: train and analyse grids of transfer-learning experiments.

transfusion list                                    # presets (with job counts), models, inits, datasets
transfusion run demo                                # a preset grid, on this machine
transfusion run examples/folder.yaml                # your data: start from a file in examples/
transfusion run my-grid.yaml --set train.steps=500  # a variant of a grid: runs as my-grid+<hash>
transfusion plan full-grid --gpu a100               # jobs, FLOPs, hours, disk and price; starts nothing
transfusion status demo                             # finished / running / pending / failed jobs
transfusion ui                                      # the MLflow UI on the last grid's runs
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
import webbrowser
from pathlib import Path

from flows.arguments import (  # noqa: F401  (re-exported: the command line's argument types)
    apply_overrides,
    load_grid_with_overrides,
    non_negative_float,
    non_negative_int,
    parse_overrides,
    port_number,
    positive_float,
    positive_int,
    resolution_px,
    writable_directory,
)

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
log = logging.getLogger("transfusion")
_USER_ENV = frozenset(key for key in QUIET_ENV if key in os.environ)
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


def check_services(*, with_compute: bool) -> None:
    """Configured services must answer before a flow starts (its logs would bury the cause)."""
    from transfusion.home import storage_path
    from transfusion.preflight import check_ray_address, check_storage_path, check_tracking_server

    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        check_tracking_server(configured)
    if with_compute:
        check_storage_path(storage_path())
        check_ray_address()


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
    from tasks.training import check_data_sizes
    from transfusion.identity import RetrainFilter
    from transfusion.preflight import check_pretrained_sources

    grid = load_grid_with_overrides(args.grid, args.set, name=getattr(args, "name", None))
    retrain = getattr(args, "retrain", None)
    RetrainFilter.parse(retrain)  # a bad filter is one line, before anything starts
    if getattr(args, "dry_run", False):
        from flows.arguments import warn_gpus_left_idle
        from flows.plan_cli import print_plan

        warn_gpus_left_idle(grid)
        print_plan(grid, device=None, price_per_hour=None)
        return 0
    check_services(with_compute=True)
    check_pretrained_sources(grid.sources)  # a missing weights file, before any service starts
    # Check the data sizes before any service starts: from the data's version where it
    # says the pool's size, so a re-run with nothing to train prepares (reads) nothing.
    check_data_sizes(grid)
    from flows.grid import transfusion

    started = time.perf_counter()
    with progress_display():
        summary = transfusion(grid, retrain=retrain)
    elapsed = time.perf_counter() - started
    print()
    elsewhere = f"{len(summary.elsewhere)} trained by another grid run, " if summary.elsewhere else ""
    print(f"Grid {summary.grid}: {summary.finished} trained, {summary.skipped} already done, {elsewhere}"
          f"{len(summary.failed)} failed, in {elapsed:.0f} s")  # fmt: skip
    print()
    console = table_console()
    print_markdown_tables(summary.table_markdown, console)
    if summary.transfer_markdown:
        print_markdown_tables(summary.transfer_markdown, console)
    if summary.similarity_markdown.strip():
        print("Top-layer SVCCA similarity between seeds:")
        print_markdown_tables(summary.similarity_markdown, console)
    print_summary(summary.summary_markdown, console)
    for line in summary.elsewhere:
        print(f"Trained by another grid run meanwhile: {line}")
    for line in summary.failed:
        print(f"FAILED: {line}")
    print(f"Runs: MLflow experiment {summary.grid!r} (parent run {summary.parent_run_id}); "
          f"tables and plots are artifacts of the parent run under tables/.")  # fmt: skip
    if summary.report_dir:
        print(f"Report: {Path(summary.report_dir) / 'report.html'}")
    from transfusion.home import transfusion_home

    print(f"Browse them with: transfusion ui   (store: {transfusion_home()})")
    return 1 if summary.failed else 0


def command_ui(args: argparse.Namespace) -> int:
    from flows.runtime import start_mlflow_server
    from transfusion.home import transfusion_home
    from transfusion.tracking import experiment_page_url, last_grid_experiment

    server = start_mlflow_server(transfusion_home(), host=args.host, port=args.port, tied=True)
    experiment_id = last_grid_experiment(uri=server.url)
    url = experiment_page_url(server.url, experiment_id) if experiment_id else server.url
    print(f"MLflow UI at {url}  (the last grid's runs; Ctrl-C to stop)", flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    finally:
        server.stop()
    return 0


def threshold_overrides(args: argparse.Namespace) -> list[str]:
    """``--threshold`` / ``--threshold-mode`` as the grid fields they set."""
    overrides = []
    if getattr(args, "threshold", None) is not None:
        overrides.append(f"convergence_threshold={args.threshold}")
    if getattr(args, "threshold_mode", None) is not None:
        overrides.append(f"convergence_mode={args.threshold_mode}")
    return overrides


def command_analyze(args: argparse.Namespace) -> int:
    from flows.plan_cli import check_grid_arguments, grid_from_args, tracking_store

    check_grid_arguments(args)
    out = str(writable_directory(args.out)) if getattr(args, "out", None) else None
    check_services(with_compute=False)
    from flows.grid import transfusion

    if getattr(args, "run_id", None):
        # The parent run names the grid; the store it is read from serves the analysis too.
        with tracking_store(required=True) as store:
            grid = grid_from_args(args, store=store, extra=threshold_overrides(args))
            summary = transfusion(grid, stage="analysis", report_dir=out)
    else:
        grid = grid_from_args(args, extra=threshold_overrides(args))
        summary = transfusion(grid, stage="analysis", report_dir=out)
    if summary.missing_line:
        print(summary.missing_line)
    console = table_console()
    print_markdown_tables(summary.table_markdown, console)
    if summary.transfer_markdown:
        print_markdown_tables(summary.transfer_markdown, console)
    print_summary(summary.summary_markdown, console)
    print(
        f"Report: {Path(summary.report_dir) / 'report.html'} (also under report/ of parent run {summary.parent_run_id})"
    )
    return 0


def deprecated(old: str, new: str) -> None:
    """The one-line notice for a spelling kept for one release."""
    log.warning("%s is deprecated and goes in the next release; use %s", old, new)


def pretrain_spellings(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(pretrained, source)`` from ``pretrain``'s options, reading the old spellings too.

    Before one spelling per concept, ``--source`` named what to pretrain on and ``--data``
    the files; without ``--pretrained`` an old-style ``--source`` keeps its old meaning.
    """
    pretrained, source = args.pretrained, args.source
    if pretrained is None and source is not None:
        deprecated("pretrain --source SOURCE (what to pretrain on)", f"--pretrained {source}")
        pretrained, source = source, None
    if args.data is not None:
        if source is not None:
            raise ValueError("--data is the old spelling of --source (the files); give only --source")
        deprecated("pretrain --data", "--source (the dataset's files, as in data prepare)")
        source = args.data
    return pretrained or "synthetic", source


def command_pretrain(args: argparse.Namespace) -> int:
    from tasks.pretraining import SYNTHETIC_SOURCE, pretrain_grid
    from tasks.training import prepare_dataset_task
    from transfusion.config import DOMAIN_PREFIX, domain_dataset, load_grid
    from transfusion.data.synthetic import PROCEDURAL_DATASETS
    from transfusion.models import MODELS, canonical_model_name

    MODELS.get(args.model)  # one clear line for an unknown name, before anything starts
    model = canonical_model_name(args.model)
    pretrained, data = pretrain_spellings(args)
    domain = pretrained.startswith(DOMAIN_PREFIX)
    if domain:
        dataset = domain_dataset(pretrained)
        if dataset not in PROCEDURAL_DATASETS and not data:
            raise ValueError(f"--pretrained {pretrained}: {dataset} is read from files; give them with --source")
    elif data:
        raise ValueError("--source (files) goes with --pretrained domain:<dataset>; an ImageNet folder is --pretrained")
    elif pretrained != SYNTHETIC_SOURCE and not pretrained.startswith("s3://") and not Path(pretrained).is_dir():
        raise ValueError(
            f"--pretrained {pretrained}: not 'synthetic', 'domain:<dataset>', an s3:// URI or an existing folder"
        )
    grid = pretrain_grid(
        model, source=pretrained, resolution=args.resolution, steps=args.steps, seed=args.seed,
        epochs=args.epochs, workers=args.workers, gpus_per_worker=args.gpus, data=data,
    ).model_dump(mode="json")  # fmt: skip
    prepare_dataset_task.fn(load_grid(grid))
    check_services(with_compute=True)
    from flows.pretrain import pretrain

    uri = pretrain(
        model=model, source=pretrained, steps=args.steps, resolution=args.resolution, seed=args.seed,
        epochs=args.epochs, workers=args.workers, gpus_per_worker=args.gpus, data=data,
    )  # fmt: skip
    print(f"registered {uri}")
    return 0


# Tables the CLI prints fit this many columns in a log (on a terminal: its width).
LOG_WIDTH = 120


def table_console():
    """A rich console for stdout: the terminal's width on a terminal, ``LOG_WIDTH`` in a log."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else LOG_WIDTH, highlight=False, soft_wrap=False)


def print_markdown_tables(text: str, console=None) -> None:
    """Markdown text with its pipe tables drawn to fit the console (cells wrap); other lines as they are."""
    from rich import box
    from rich.table import Table

    console = console or table_console()
    block: list[list[str]] = []

    def flush() -> None:
        if not block:
            return
        header, *body = block
        rule = next((cells for cells in body if all(cell and set(cell) <= set(":-") for cell in cells)), [])
        table = Table(box=box.MARKDOWN)
        for i, name in enumerate(header):
            right = i < len(rule) and rule[i].endswith(":") and not rule[i].startswith(":")
            table.add_column(name, overflow="fold", justify="right" if right else "left")
        for cells in body:
            if cells is not rule:
                table.add_row(*cells)
        with console.capture() as captured:
            console.print(table)
        # The box's blank top and bottom edges and the padding to full width are noise in a log.
        for line in captured.get().splitlines():
            if line.strip():
                print(line.rstrip())
        block.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            block.append([cell.strip() for cell in stripped[1:-1].split("|")])
            continue
        flush()
        print(line)
    flush()


def print_summary(text: str, console) -> None:
    """The report's summary as plain paragraphs wrapped to the console (at most 120 columns)."""
    import textwrap

    width = min(console.width, 120)
    for paragraph in text.replace("**", "").split("\n\n"):
        paragraph = " ".join(paragraph.split())
        if paragraph:
            print(textwrap.fill(paragraph.removeprefix("### "), width=width))
            print()


def preset_rows() -> list[dict]:
    """Each preset's name, one-line description and job count."""
    from transfusion.config import load_grid
    from transfusion.presets import PRESETS

    rows = []
    for name in PRESETS.names():
        doc = (PRESETS.get(name).__doc__ or "").strip()
        # The docstring's first sentence, without reST literals: a line a terminal shows as is.
        description = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
        rows.append({"name": name, "description": description, "jobs": len(load_grid(name).jobs())})
    return rows


def list_contents() -> dict:
    """What ``transfusion list`` shows, as data."""
    from transfusion.data import list_datasets
    from transfusion.inits import list_inits
    from transfusion.models import MODELS, list_models
    from transfusion.pretrained import get_pretrained_source, list_pretrained_sources

    sources = [get_pretrained_source(name) for name in list_pretrained_sources()]
    return {
        "presets": preset_rows(),
        "models": list_models(),
        "model_aliases": MODELS.aliases(),
        "inits": list_inits(),
        "init_aliases": {"transfer": "imagenet"},
        "datasets": list_datasets(),
        "pretrained_sources": [
            {"name": s.name, "kind": s.kind, "model": s.model, "licence": s.licence} for s in sources
        ],
    }


def command_list(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    contents = list_contents()
    if args.json:
        print(json.dumps(contents, indent=2))
        return 0
    console = table_console()
    presets = Table(title="grid presets (transfusion run NAME)", title_justify="left", box=None, expand=False)
    presets.add_column("preset", no_wrap=True)
    presets.add_column("jobs", justify="right", no_wrap=True)
    presets.add_column("what it runs", overflow="fold")
    for row in contents["presets"]:
        presets.add_row(row["name"], str(row["jobs"]), row["description"])
    console.print(presets)
    console.print()
    aliases = ", ".join(f"{old} -> {new}" for old, new in sorted(contents["model_aliases"].items()))
    for label, names, note in (
        ("models", contents["models"], f"(also accepted: {aliases})"),
        ("inits", contents["inits"], "(transfer: alias of imagenet, for any source)"),
        ("datasets", contents["datasets"], ""),
    ):
        console.print(f"{label + ':':<10}{', '.join(names)} {note}".rstrip(), overflow="fold")
    console.print()
    sources = Table(
        title="pretrained sources (also synthetic, imagenet, domain:<dataset>, a path or URI)",
        title_justify="left",
        box=None,
    )
    for column in ("source", "kind", "model"):
        sources.add_column(column, no_wrap=True)
    sources.add_column("licence", overflow="fold")
    for row in contents["pretrained_sources"]:
        sources.add_row(row["name"], row["kind"], row["model"], row["licence"])
    console.print(sources)
    return 0


VERBOSE_HELP = "log at INFO level and show tracebacks (before or after the command)"
SET_HELP = (
    "override a grid field, e.g. train.steps=50 or models=cbr-tiny (a single value for a list field is a "
    "list of one); repeatable"
)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes answer like every other bad input: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="Figure 5 convergence threshold: validation AUC (absolute, default 0.91 as the paper) "
        "or fraction of each cell's best (with --threshold-mode relative)",
    )  # fmt: skip
    parser.add_argument(
        "--threshold-mode", choices=["absolute", "relative"], default=None,
        help="absolute: --threshold is a validation AUC; relative: a fraction of each cell's best AUC",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from flows.plan_cli import add_name_argument, add_run_id_argument

    parser = OneLineErrorParser(
        prog="transfusion", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a grid (preset name or YAML/JSON file)")
    run.add_argument("grid", help="preset name (demo, smoke, ...) or path to a grid file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    run.add_argument(
        "--retrain",
        nargs="?",
        const="",
        default=None,
        metavar="FILTER",
        help="train matching jobs again though they finished (FILTER e.g. model=cbr-tiny,init=random; "
        "fields model, init, data_size, seed, source; none: every job); the old runs are kept, tagged superseded_by",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="print the plan (as transfusion plan) and exit, starting nothing"
    )
    add_name_argument(run)
    run.set_defaults(func=command_run)

    ui = sub.add_parser("ui", help="serve the MLflow UI on the local store")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=port_number, default=5000, help="port to listen on (default 5000)")
    ui.add_argument("--open", action="store_true", help="open the page in a web browser")
    ui.set_defaults(func=command_ui)

    ana = sub.add_parser("analyze", help="re-run the analyses of a trained grid from its stored artifacts")
    ana.add_argument("grid", nargs="?", help="the trained grid as given to run: preset name or grid file (or --run-id)")
    ana.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    add_name_argument(ana)
    add_run_id_argument(ana)
    add_threshold_arguments(ana)
    ana.set_defaults(func=command_analyze)

    rep = sub.add_parser("report", help="write a trained grid's report (Markdown + self-contained HTML)")
    rep.add_argument("grid", nargs="?", help="the trained grid as given to run: preset name or grid file (or --run-id)")
    rep.add_argument("--out", required=True, help="directory for report.md, report.html, tables and figures")
    rep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    add_name_argument(rep)
    add_run_id_argument(rep)
    add_threshold_arguments(rep)
    rep.set_defaults(func=command_analyze)

    pre = sub.add_parser("pretrain", help="pretrain a model on a source set and register it in MLflow")
    pre.add_argument("--model", required=True, help="model to pretrain (see: transfusion list)")
    pre.add_argument(
        "--pretrained",
        default=None,
        help="what to pretrain on: 'synthetic' (default), 'domain:<dataset>' (a registered medical set) "
        "or an ImageNet-style folder / s3:// URI",
    )
    pre.add_argument(
        "--source", default=None, help="the files of a domain:<dataset> set (a folder or s3:// URI), as in data prepare"
    )
    pre.add_argument("--data", default=None, help=argparse.SUPPRESS)  # the old spelling of --source
    pre.add_argument("--steps", type=positive_int, default=None, help="steps (synthetic: 120; a folder: from --epochs)")
    pre.add_argument("--epochs", type=positive_float, default=None, help="passes over an ImageNet folder (default 90)")
    pre.add_argument(
        "--resolution", type=resolution_px, default=None, help="default: synthetic 40; the model's standard size"
    )
    pre.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers (data parallel)")
    pre.add_argument("--gpus", type=non_negative_float, default=0.0, help="GPUs per worker")
    pre.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial weights and data order")
    pre.set_defaults(func=command_pretrain)

    from flows.data_cli import add_data_commands
    from flows.plan_cli import add_plan_commands
    from flows.stack import add_stack_commands

    add_stack_commands(sub)
    add_data_commands(sub)
    add_plan_commands(sub)

    lst = sub.add_parser("list", help="list presets (with job counts), models, inits, datasets and pretrained sources")
    lst.add_argument("--json", action="store_true", help="print the same as one JSON object")
    lst.set_defaults(func=command_list)
    _verbose_after_any_command(parser)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (sub)command parser under ``parser``, depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


def _verbose_after_any_command(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand that does not see -v leaves the top level's value alone.
    for child in _subparsers(parser):
        if "--verbose" not in child._option_string_actions:
            child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


# Errors whose message is written for the user; anything else also names its type.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, TimeoutError)


def error_line(exc: BaseException) -> str:
    """The one line a user sees for ``exc``: its first line, field-named for a validation error."""
    from pydantic import ValidationError

    from transfusion.config import format_validation_error

    if isinstance(exc, ValidationError):
        text = format_validation_error(exc, where=exc.title)
    else:
        text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if not isinstance(exc, USER_ERRORS) or not first:
        first = f"{type(exc).__name__}: {first}".rstrip(": ")
    return first


def _quiet_orchestration_logs(verbose: bool) -> None:
    # A failing flow logs its traceback at ERROR; without --verbose the user sees the
    # cause once, as the last line, instead.
    if not verbose and "PREFECT_LOGGING_LEVEL" not in _USER_ENV:
        os.environ["PREFECT_LOGGING_LEVEL"] = "CRITICAL"
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


# Kubernetes' default grace period is 30 s: what a clean stop has not done by then, a forced one does.
INTERRUPT_GRACE_S = 25.0
# Commands whose interrupt leaves MLflow runs to continue.
COMMANDS_WITH_RUNS = frozenset({"run", "pretrain", "analyze", "report"})  # not plan/status/export: they only read


class SignalShutdown:
    """One shutdown path for SIGINT and SIGTERM.

    The first signal raises :class:`~transfusion.errors.Interrupted` in the main thread
    (a KeyboardInterrupt: every ``finally`` and interrupt handler on the way runs) and
    arms a watchdog; :meth:`finish` then ends the open runs KILLED, stops Ray, Prefect's
    temporary server and every tied service, prints one line and exits 128 + signal.
    A second signal, or the watchdog after ``INTERRUPT_GRACE_S``, exits at once, still
    killing the servers' process groups.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.interrupt = None
        self._signals = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalShutdown:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
            if "tasks.training" in sys.modules or self.command in COMMANDS_WITH_RUNS:
                from tasks.training import INTERRUPT_LISTENERS

                INTERRUPT_LISTENERS.append(self._stopping)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if "tasks.training" in sys.modules:
            with contextlib.suppress(ValueError):
                sys.modules["tasks.training"].INTERRUPT_LISTENERS.remove(self._stopping)

    def _handle(self, signum: int, frame) -> None:
        from transfusion.errors import Interrupted

        self._signals += 1
        if self._signals > 1:
            self._exit(forced=True)
        # Set already when Prefect caught a SIGTERM first (it re-sends it here once the flow has unwound).
        self._stopping(Interrupted(signum))
        raise self.interrupt

    def _stopping(self, interrupt) -> None:
        """The first interrupt, seen here or (SIGTERM during a Prefect flow) by the flow."""
        if self.interrupt is not None or not self._previous or not interrupt.delivered:
            return
        self.interrupt = interrupt
        self._quiet()
        watchdog = threading.Timer(INTERRUPT_GRACE_S, self._exit, kwargs={"forced": True})
        watchdog.daemon = True
        watchdog.start()

    @staticmethod
    def _quiet() -> None:
        # What unwinds now (Prefect's crash report, Ray's workers, job threads) is expected: one line says it all.
        logging.disable(logging.CRITICAL)
        threading.excepthook = lambda args: None

    def finish(self, exc: BaseException) -> int:
        """The clean stop after ``exc`` reached :func:`main`.

        After a signal it never returns. A KeyboardInterrupt raised without one (code
        calling :func:`main` in-process) only ends the open runs and returns the code:
        the caller's processes are not this command's to stop.
        """
        if self.interrupt is None:
            from tasks.training import interrupt_of

            interrupt = interrupt_of(exc)
            print(self._line(interrupt), file=sys.stderr, flush=True)
            return interrupt.exit_code
        self._exit(forced=False)
        return self.interrupt.exit_code  # not reached

    def _line(self, interrupt) -> str:
        line = f"transfusion: {interrupt}"
        if self.command in COMMANDS_WITH_RUNS:
            line += "; runs marked KILLED, re-run to continue"
        return line

    def _exit(self, *, forced: bool) -> None:
        release_started_processes(self.interrupt, forced=forced)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            print(self._line(self.interrupt), file=sys.stderr, flush=True)
        # Last: threads touching Ray after this may end the process. Ray's agents outlive
        # their killed raylet, so whatever this process started and is still there goes too.
        from flows.runtime import descendants, kill_processes

        started = descendants()
        if "transfusion.launcher" in sys.modules:
            with contextlib.suppress(Exception):
                sys.modules["transfusion.launcher"].kill_local_ray()
        kill_processes(started)
        # os._exit: Prefect's and Ray's threads may still wait on what was just stopped.
        os._exit(self.interrupt.exit_code)


def release_started_processes(interrupt: BaseException, *, forced: bool) -> None:
    """Everything this process started goes: its open runs end KILLED, Ray and the servers stop.

    Only modules already imported are asked (nothing to stop in one never loaded);
    ``forced`` skips whatever could wait (MLflow calls, a graceful Ray shutdown).
    """
    # Only while a tracking server answers (the embedded one is gone once its flow has unwound).
    if not forced and "tasks.training" in sys.modules and os.environ.get("MLFLOW_TRACKING_URI"):
        with contextlib.suppress(Exception):
            sys.modules["tasks.training"].interrupt_open_runs(interrupt)
    if not forced and "transfusion.launcher" in sys.modules:  # no queued job starts
        with contextlib.suppress(Exception):
            sys.modules["transfusion.launcher"].close_pools(wait=False)
    if "flows.runtime" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["flows.runtime"].stop_tied_services(force=forced)
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is not None:  # Prefect's temporary server (a child process of this one)
        for server in list(server_module.SubprocessASGIServer._instances.values()):
            process = getattr(server, "server_process", None)
            with contextlib.suppress(Exception):
                if forced and process is not None:
                    process.kill()
                else:
                    server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    configure_logging(verbose=args.verbose)
    _quiet_orchestration_logs(args.verbose)
    from prefect.exceptions import TerminationSignal

    with SignalShutdown(args.command) as shutdown:
        try:
            return args.func(args)
        except (KeyboardInterrupt, TerminationSignal) as exc:
            return shutdown.finish(exc)
        except Exception as exc:
            return _report_error(exc, verbose=args.verbose)


def _report_error(exc: Exception, *, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    print(f"transfusion: error: {error_line(exc)}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
