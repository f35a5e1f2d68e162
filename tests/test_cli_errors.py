"""Every bad input a new user can type gets one clear line, a non-zero exit and no RUNNING run.

Each case runs the real CLI in-process (``flows.cli.main``) against one tracking server
shared by the session; almost all fail before a flow or any other service starts.
"""

from __future__ import annotations

import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flows.cli import main

SMOKE_POOL = 240  # training images of the smoke grid's synthetic-retina set


@dataclass(frozen=True)
class BadInput:
    """A command line, what it must print as its one line, and its exit code."""

    name: str
    argv: tuple[str, ...]
    message: str  # a regex for the line after "transfusion[ COMMAND]: error: "
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)  # values formatted like argv
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under the test's tmp dir first


def _case(name, argv, message, **kwargs) -> BadInput:
    return BadInput(name, tuple(argv.split()) if isinstance(argv, str) else tuple(argv), message, **kwargs)


GRID = "name: mine\ndataset: synthetic-retina\nmodels: [cbr-tiny]\ninits: [random]\n"

CASES = [
    # --- top level -----------------------------------------------------------------
    _case("no command", "", r"the following arguments are required: command .*"),
    _case("unknown command", "trian smoke", r"argument command: invalid choice: 'trian' .*'run'.*"),
    _case("list takes no argument", "list models", r"unrecognized arguments: models .*"),
    # --- run: grid references --------------------------------------------------------
    _case("unknown preset", "run smok", r"'smok' is neither a grid preset \(.*smoke.*\) nor .*"),
    _case("missing grid file", "run {tmp}/nope.yaml", r"grid file .*/nope\.yaml does not exist"),
    _case(
        "grid file not YAML",
        "run {tmp}/bad.yaml",
        r"grid file .*bad\.yaml line 2: not valid YAML/JSON",
        files={"bad.yaml": "name: [unclosed\n"},
    ),
    _case(
        "grid file a list",
        "run {tmp}/list.yaml",
        r"grid file .*: expected a mapping of grid fields",
        files={"list.yaml": "- a\n- b\n"},
    ),
    _case(
        "unknown grid field",
        "run {tmp}/g.yaml",
        r"grid file .*: stepz: Extra inputs are not permitted \(did you mean train\.steps\?\)",
        files={"g.yaml": GRID + "stepz: 3\n"},
    ),
    # --- run: grid values ----------------------------------------------------------
    _case("seeds true", "run smoke --set seeds=true", r"grid: seeds: expected a number, got True"),
    _case("negative seed count", "run smoke --set seeds=-1", r"grid: seeds: .*seed count must be >= 1, got -1"),
    _case("duplicate seeds", "run smoke --set seeds=[1,1]", r"grid: seeds: seeds must be distinct, got \[1, 1\]"),
    _case("infinite lr", "run smoke --set train.lr=.inf", r"grid: train\.lr: Input should be a finite number"),
    _case("NaN lr", "run smoke --set train.lr=.nan", r"grid: train\.lr: Input should be a finite number"),
    _case("zero steps", "run smoke --set train.steps=0", r"grid: train\.steps: Input should be greater than 0"),
    _case("steps a boolean", "run smoke --set train.steps=false", r"grid: train: steps: expected a number, got False"),
    _case("momentum 1", "run smoke --set train.momentum=1", r"grid: train\.momentum: Input should be less than 1"),
    _case(
        "unknown optimizer",
        "run smoke --set train.optimizer=adamw",
        r"grid: train\.optimizer: Input should be 'adam' or 'sgd'",
    ),
    _case(
        "duplicate models",
        "run smoke --set models=[cbr-tiny,cbr-tiny]",
        r"grid: models: 'cbr-tiny' is listed twice \(entries must be distinct\)",
    ),
    _case(
        "duplicate inits",
        "run smoke --set inits=[random,random]",
        r"grid: inits: 'random' is listed twice \(entries must be distinct\)",
    ),
    _case(
        "duplicate data sizes",
        "run smoke --set data_sizes=[100,100]",
        r"grid: data_sizes: 100 is listed twice \(entries must be distinct\)",
    ),
    _case(
        "unknown model",
        "run smoke --set models=[resnet-9000]",
        r"grid: models\.0: unknown model 'resnet-9000'; valid: .*cbr-tiny.*",
    ),
    _case("unknown init", "run smoke --set inits=[magic]", r"grid: inits\.0.*unknown init 'magic'; valid: .*random.*"),
    _case(
        "transfusion k out of range",
        ["run", "smoke", "--set", "pretrained=synthetic", "--set", "inits=[{{name: transfusion, options: {{k: 99}}}}]"],
        r"grid: inits: transfusion k must be an int in 0\.\.3 \(0: up to conv1, .*\), got 99 \(model cbr-tiny\)",
    ),
    _case(
        "unknown init option",
        ["run", "smoke", "--set", "inits=[{{name: random, options: {{k: 1}}}}]"],
        r"grid: inits: init 'random': unknown options \['k'\].*valid options: none.*",
    ),
    _case(
        "transfer init without source",
        "run smoke --set inits=[imagenet]",
        r"grid: inits \['imagenet'\] copy pretrained weights: set pretrained to .*",
    ),
    _case(
        "source for another architecture",
        "run smoke --set inits=[random,transfer] --set pretrained=[dino-resnet50]",
        r"grid: pretrained: source 'dino-resnet50' holds resnet50 weights; it does not fit cbr-tiny",
    ),
    _case(
        "unknown domain source",
        "run smoke --set inits=[random,transfer] --set pretrained=[domain:mnist]",
        r"grid: unknown dataset 'mnist'; valid: .*synthetic-chest.*",
    ),
    _case(
        "registered source missing from the cache",
        "run smoke --set models=[resnet50] --set inits=[random,transfer] --set pretrained=radimagenet-resnet50",
        r"pretrained source radimagenet-resnet50: cache:radimagenet/.* not found at .*; "
        r"to get it, request .*radimagenet\.com",
    ),
    _case(
        "resolution below model minimum",
        "run smoke --set models=[inception-v3] --set train.resolution=32",
        r"grid: train\.resolution 32 is below the minimum input size of inception-v3 \(75 px\)",
    ),
    _case(
        "data size above the pool",
        f"run smoke --set data_sizes=[{SMOKE_POOL + 1}]",
        rf"data_size {SMOKE_POOL + 1} is larger than the {SMOKE_POOL} training images .*",
    ),
    _case("unknown dataset option", "run smoke --set dataset_options.colour=red", r".*colour.*"),
    # --- run: --set syntax ---------------------------------------------------------
    _case("--set without =", "run smoke --set train.steps", r"--set expects KEY=VALUE .*got 'train\.steps'"),
    _case("--set empty key part", "run smoke --set train..steps=3", r"--set expects KEY=VALUE .*"),
    _case(
        "--set invalid YAML",
        "run smoke --set train.steps=[1",
        r"--set train\.steps=\[1: '\[1' is not a valid YAML value .*",
    ),
    _case(
        "--set below a scalar",
        "run smoke --set train.steps.x=1",
        r"--set train\.steps\.x=1: train\.steps is a value \(6\), not a group of fields",
    ),
    _case(
        "--retrain unknown field",
        "run smoke --retrain lr=0.1",
        r"--retrain: unknown field 'lr'; valid: model, init, data_size, seed, source",
    ),
    _case("--retrain without =", "run smoke --retrain cbr-tiny", r"--retrain expects FIELD=VALUE pairs .*"),
    # --- run: services -------------------------------------------------------------
    _case(
        "Ray address unreachable",
        "run smoke",
        r"Ray cluster at RAY_ADDRESS=127\.0\.0\.1:1 is unreachable .*",
        env={"RAY_ADDRESS": "127.0.0.1:1"},
    ),
    _case(
        "Ray address malformed",
        "run smoke",
        r"RAY_ADDRESS 'head-node' is not host:port .*",
        env={"RAY_ADDRESS": "head-node"},
    ),
    _case(
        "tracking server unreachable",
        "run smoke",
        r"MLflow tracking server http://127\.0\.0\.1:1 is unreachable .*",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"},
    ),
    # --- analyze / report ----------------------------------------------------------
    _case("analyze unknown preset", "analyze smok", r"'smok' is neither a grid preset .*"),
    _case("analyze bad --set", "analyze smoke --set train.lr=-1", r"grid: train\.lr: Input should be greater than 0"),
    _case("report without --out", "report smoke", r"the following arguments are required: --out .*"),
    _case(
        "report --out is a file",
        "report smoke --out {tmp}/taken",
        r"--out .*/taken is a file, not a directory",
        files={"taken": "x"},
    ),
    _case(
        "report --out under a file",
        "report smoke --out {tmp}/taken/sub",
        r"--out .*/taken/sub: cannot create the directory \(Not a directory\)",
        files={"taken": "x"},
    ),
    _case(
        "report --run-id with a grid",
        "report smoke --out {tmp}/r --run-id abc",
        r"--run-id names the grid already: give it without GRID, --set or --name",
    ),
    _case("analyze with no grid", "analyze", r"name a grid \(a preset or a grid file\) or a parent run with --run-id"),
    # --- run: new options ----------------------------------------------------------
    _case("run --name with a space", ["run", "smoke", "--name", "my grid"], r"grid: name: String should match .*"),
    _case("run --dry-run bad --set", "run smoke --dry-run --set train.steps=0", r"grid: train\.steps: .*"),
    # --- plan / status / export ----------------------------------------------------
    _case("plan unknown gpu", "plan smoke --gpu tpu", r"argument --gpu: expected one of a100, h100, l4, a10g, cpu, .*"),
    _case(
        "plan negative price",
        "plan smoke --price-per-hour -2",
        r"argument --price-per-hour: expected a number >= 0, got -2\.0 .*",
    ),
    _case("plan unknown preset", "plan smok", r"'smok' is neither a grid preset .*"),
    _case(
        "status without a tracking store",
        "status smoke",
        r"no tracking store: MLFLOW_TRACKING_URI is not set and no grid has run under .*",
    ),
    _case(
        "status tracking server unreachable",
        "status smoke",
        r"MLflow tracking server http://127\.0\.0\.1:1 is unreachable .*",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"},
    ),
    _case("export unknown format", "export smoke --format xlsx --out x.xlsx", r"argument --format: invalid choice.*"),
    _case("export without --out", "export smoke --format csv", r"the following arguments are required: --out .*"),
    _case(
        "export --out a directory",
        "export smoke --format csv --out {tmp}",
        r"--out .* is a directory; name a file, e\.g\. .*runs\.csv",
    ),
    _case(
        "export suffix of another format",
        "export smoke --format parquet --out {tmp}/runs.csv",
        r"--out .*runs\.csv: a --format parquet file ends in \.parquet",
    ),
    # --- ui ------------------------------------------------------------------------
    _case("ui port zero", "ui --port 0", r"argument --port: expected a port number 1-65535, got 0 .*"),
    _case("ui port too large", "ui --port 70000", r"argument --port: expected a port number 1-65535, got 70000 .*"),
    _case("ui port not a number", "ui --port http", r"argument --port: expected a port number 1-65535, got 'http' .*"),
    _case(
        "ui port taken",
        "ui --port {taken_port}",
        r"port \d+ on 127\.0\.0\.1 is already taken; choose another with --port",
    ),
    # --- pretrain ------------------------------------------------------------------
    _case("pretrain unknown model", "pretrain --model cbr-huge", r"unknown model 'cbr-huge'; valid: .*cbr-tiny.*"),
    _case(
        "pretrain resolution 0",
        "pretrain --model cbr-tiny --resolution 0",
        r"argument --resolution: expected a resolution >= 8 px, got 0 .*",
    ),
    _case(
        "pretrain zero steps",
        "pretrain --model cbr-tiny --steps 0",
        r"argument --steps: expected an integer >= 1, got 0 .*",
    ),
    _case(
        "pretrain negative seed",
        "pretrain --model cbr-tiny --seed -1",
        r"argument --seed: expected an integer >= 0, got -1 .*",
    ),
    _case(
        "pretrain missing source",
        "pretrain --model cbr-tiny --pretrained {tmp}/imagenet",
        r"--pretrained .*/imagenet: not 'synthetic', 'domain:<dataset>', an s3:// URI or an existing folder",
    ),
    _case(
        "pretrain domain source from files without them",
        "pretrain --model cbr-tiny --pretrained domain:chexpert",
        r"--pretrained domain:chexpert: chexpert is read from files; give them with --source",
    ),
    _case(
        "pretrain unknown domain set",
        "pretrain --model cbr-tiny --pretrained domain:mnist",
        r"unknown dataset 'mnist'.*",
    ),
    _case(
        "pretrain below model minimum",
        "pretrain --model inception-v3 --resolution 40",
        r".*train\.resolution 40 is below the minimum input size of inception-v3 \(75 px\)",
    ),
    # --- data prepare --------------------------------------------------------------
    _case("data unknown dataset", "data prepare mnist-of-doom", r"unknown dataset 'mnist-of-doom'; valid: .*folder.*"),
    _case(
        "data resolution 0",
        "data prepare synthetic-retina --resolution 0",
        r"argument --resolution: expected a resolution >= 8 px, got 0 .*",
    ),
    _case(
        "data option without =",
        "data prepare synthetic-retina --option train",
        r"--option expects KEY=VALUE, got 'train'",
    ),
    _case(
        "data folder without source",
        "data prepare folder --resolution 32",
        r"dataset 'folder' needs a source: .*labels\.csv",
    ),
    _case(
        "data missing source",
        "data prepare folder --resolution 32 --source {tmp}/nowhere",
        r"data source .*/nowhere does not exist",
    ),
    # --- stack ---------------------------------------------------------------------
    _case("stack unknown action", "stack restart", r"argument stack_command: invalid choice: 'restart' .*"),
    _case(
        "stack port out of range",
        "stack up --ray-port 65536",
        r"argument --ray-port: expected a port number 1-65535, got 65536 .*",
    ),
    _case("stack zero cpus", "stack up --num-cpus 0", r"argument --num-cpus: expected an integer >= 1, got 0 .*"),
    _case("stack env without a stack", "stack env", r"no stack is running; start one with 'transfusion stack up'"),
    # --- spellings: typos get the nearest valid name, old names one spelling ------------
    _case(
        "set mistyped train key",
        "run smoke --set train.stepz=3",
        r"--set train\.stepz=3: unknown grid field 'train\.stepz'; did you mean train\.steps\?",
    ),
    _case(
        "set mistyped top-level key",
        "run smoke --set modles=cbr-small",
        r"--set modles=cbr-small: unknown grid field 'modles'; did you mean models\?",
    ),
    _case(
        "set key nothing resembles",
        "analyze smoke --set xyzzy=1",
        r"--set xyzzy=1: unknown grid field 'xyzzy'; see the GridSpec fields in README\.md",
    ),
    _case(
        "old and new spelling of one model",
        "run smoke --set models=[inception_v3,inception-v3]",
        r"grid: models: 'inception-v3' is listed twice \(entries must be distinct\)",
    ),
    _case(
        "pretrain old and new spelling of the files",
        "pretrain --model cbr-tiny --pretrained domain:chexpert --source {tmp} --data {tmp}",
        r"--data is the old spelling of --source \(the files\); give only --source",
    ),
    _case(
        "pretrain files without a domain source",
        "pretrain --model cbr-tiny --pretrained synthetic --source {tmp}",
        r"--source \(files\) goes with --pretrained domain:<dataset>; an ImageNet folder is --pretrained",
    ),
    _case("list --json takes no value", "list --json=yes", r"argument --json: ignored explicit argument 'yes' .*"),
    # --- files that are not what their name says; services that are not what the setting says
    _case(
        "grid file binary",
        "run {tmp}/g.yaml",
        r"grid file .*/g\.yaml: not a text YAML/JSON file \(byte 0 is not UTF-8\)",
        files={"g.yaml": b"\x89\xffPNG\r\n\x1a\n\x00\x00"},
    ),
    _case(
        "grid file a JSON array",
        "run {tmp}/g.json",
        r"grid file .*/g\.json: expected a mapping of grid fields",
        files={"g.json": "[1, 2, 3]"},
    ),
    _case(
        "grid file empty",
        "run {tmp}/g.yaml",
        r"grid file .*/g\.yaml: expected a mapping of grid fields",
        files={"g.yaml": ""},
    ),  # fmt: skip
    _case(
        "grid with no models",
        "run {tmp}/g.yaml",
        r"grid file .*: models: List should have at least 1 item.*",
        files={"g.yaml": GRID.replace("[cbr-tiny]", "[]")},
    ),  # fmt: skip
    _case("zero data size", "run smoke --set data_sizes=[0]", r"grid: data_sizes\.0: data_size must be 'full' or .*"),
    _case("zero seeds", "run smoke --set seeds=0", r"grid: seeds: seed count must be >= 1, got 0"),
    _case("zero batch size", "run smoke --set train.batch_size=0", r"grid: train\.batch_size: Input should be .*"),
    _case("zero resolution", "run smoke --set train.resolution=0", r"grid: train\.resolution: Input should be .*"),
    _case(
        "medmnist source not an npz",
        "data prepare medmnist --resolution 32 --source {tmp}/retinamnist.npz",
        r".*/retinamnist\.npz: not an npz file \(an npz is a zip archive of \.npy arrays\)",
        files={"retinamnist.npz": "id,label\n1,0\n"},
    ),
    _case(
        "folder source with an empty CSV",
        "data prepare folder --resolution 32 --source {tmp}/xrays",
        r".*/xrays/labels\.csv: missing column 'image' \(columns: none\)",
        files={"xrays/labels.csv": ""},
    ),
    _case(
        "weights file that is text",
        "run smoke --set inits=[random,transfer] --set pretrained={tmp}/w.pt",
        r"pretrained .*/w\.pt: .*/w\.pt is not a weights file torch\.load\(weights_only=True\) reads .*",
        files={"w.pt": "model weights go here\n"},
    ),
    _case(
        "weights file an npz",
        "run smoke --set inits=[random,transfer] --set pretrained={tmp}/w.pt",
        r"pretrained .*/w\.pt: .*/w\.pt is not a weights file torch\.load\(weights_only=True\) reads .*",
        files={"w.pt": b"PK\x03\x04" + bytes(60)},
    ),
    _case(
        "tracking URI a plain web server",
        "run smoke",
        r"MLFLOW_TRACKING_URI=http://127\.0\.0\.1:\d+ answers, but not as an MLflow tracking server "
        r"\(HTTP 404 on /health\)",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{http_port}"},
    ),
    _case(
        "S3 endpoint a plain web server",
        "run smoke",
        r"http://127\.0\.0\.1:\d+ \(AWS_ENDPOINT_URL\) answers, but not as S3 \(HTTP 404, server 'SimpleHTTP.*'\);.*",
        env={
            "TRANSFUSION_STORAGE_PATH": "s3://grids",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:{http_port}",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
        },
    ),
    _case(
        "S3 storage without credentials",
        "run smoke",
        r"no S3 credentials for storage path s3://grids: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY .*",
        env={
            "TRANSFUSION_STORAGE_PATH": "s3://grids",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:{http_port}",
            "AWS_SHARED_CREDENTIALS_FILE": "{tmp}/none",
            "AWS_CONFIG_FILE": "{tmp}/none",
            "AWS_ACCESS_KEY_ID": "",
            "AWS_SECRET_ACCESS_KEY": "",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    ),
]


def _running_runs(uri: str) -> set[str]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", run_view_type=ViewType.ALL)
    return {r.info.run_id for r in runs}


@pytest.fixture
def cli_home(tiny_retina, monkeypatch, tmp_path) -> Path:
    """A clean state dir per case: no tracking server configured, no cluster, no stack."""
    for key in ("RAY_ADDRESS", "PREFECT_API_URL", "TRANSFUSION_STORAGE_PATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("TRANSFUSION_HOME", str(home))
    # The smoke grid's data is prepared once per session; each case reads it from its own home.
    (home / "data").mkdir(parents=True)
    shutil.copytree(Path(tiny_retina.root).parent, home / "data" / "synthetic-retina")
    return home


@pytest.fixture
def taken_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def http_port():
    """A plain ``http.server`` on loopback: a service that answers, but as nothing the settings expect."""
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # its request lines would land in the test's stderr
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_the_table_covers_every_command_and_thirty_inputs():
    commands = {case.argv[0] for case in CASES if case.argv}
    assert commands >= {
        "run",
        "analyze",
        "report",
        "ui",
        "pretrain",
        "data",
        "stack",
        "list",
        "plan",
        "status",
        "export",
    }
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_gets_one_line_and_a_non_zero_exit(
    case, cli_home, taken_port, http_port, monkeypatch, tmp_path, capsys
):
    for name, text in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(text) if isinstance(text, bytes) else (tmp_path / name).write_text(text)
    places = {"tmp": tmp_path, "taken_port": taken_port, "http_port": http_port}
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(**places))
    argv = [arg.format(**places) for arg in case.argv]
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1, err
    assert re.fullmatch(rf"transfusion(?: [a-z ]+)?: error: {case.message}", lines[0]), lines[0]
    assert "Traceback" not in out + err
    # Refused before a tracking store existed: no run was opened, so none is left RUNNING.
    assert not (cli_home / "mlflow.db").exists()
    assert not (cli_home / "tracking").exists()


def test_verbose_adds_the_traceback_before_the_same_last_line(cli_home, capsys):
    assert main(["--verbose", "run", "smoke", "--set", "train.steps.x=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback (most recent call last):" in err
    assert err[-1] == "transfusion: error: --set train.steps.x=1: train.steps is a value (6), not a group of fields"


@pytest.mark.slow
def test_analyze_of_a_grid_never_trained_is_an_error_and_leaves_no_run(mlflow_server, cli_home, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    before = _running_runs(mlflow_server.url)
    code = main(["analyze", "smoke", "--set", "name=never-trained"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        f"transfusion: error: grid 'never-trained' has no finished jobs in the tracking store {mlflow_server.url}; "
        "train it first: transfusion run never-trained"
    )
    assert "Traceback" not in "\n".join(err)
    experiment = MlflowClient(mlflow_server.url).get_experiment_by_name("never-trained")
    assert experiment is None or not MlflowClient(mlflow_server.url).search_runs([experiment.experiment_id])
    assert _running_runs(mlflow_server.url) <= before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("raised", "code", "line", "status", "reason"),
    [
        (
            RuntimeError("disk full while writing tables"),
            2,
            "transfusion: error: disk full while writing tables",
            "FAILED",
            "RuntimeError: disk full while writing tables",
        ),
        (
            KeyboardInterrupt(),
            130,
            "transfusion: interrupted by SIGINT; runs marked KILLED, re-run to continue",
            "KILLED",
            "interrupted by SIGINT",
        ),
    ],
    ids=["error", "interrupt"],
)
def test_a_grid_stopped_after_its_run_opened_ends_that_run_with_the_reason(
    raised, code, line, status, reason, mlflow_server, cli_home, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    import flows.grid

    def stop(*args, **kwargs):
        raise raised

    monkeypatch.setattr(flows.grid, "_train_jobs", stop)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    name = f"stopped-{status.lower()}"
    assert main(["run", "smoke", "--set", f"name={name}"]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == status
    assert run.data.tags["failure_reason"] == reason


def test_ray_address_check_refuses_a_port_that_is_not_a_ray_head():
    import http.server
    import threading

    from transfusion.preflight import check_ray_address

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        with pytest.raises(RuntimeError, match=rf"RAY_ADDRESS={address} answers, but not as a Ray head"):
            check_ray_address(address, timeout=3)
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match=r"RAY_ADDRESS 'ray://head' is not host:port"):
        check_ray_address("ray://head")
    check_ray_address("auto")  # left to Ray, which finds a local cluster itself


@pytest.mark.slow
def test_ray_address_check_accepts_a_real_ray_head(ray_cluster):
    import ray

    from transfusion.preflight import check_ray_address

    check_ray_address(ray.get_runtime_context().gcs_address, timeout=5)


def test_weights_check_reads_every_real_weights_format_and_refuses_the_rest(tmp_path):
    import torch
    from safetensors.torch import save_file

    from transfusion.preflight import check_weights_file

    tensors = {"conv.weight": torch.zeros(2, 3), "fc.bias": torch.ones(2)}
    torch.save(tensors, tmp_path / "plain.pt")
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "checkpoint.pth")
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(tensors, tmp_path / "model.safetensors")
    for name in ("plain.pt", "checkpoint.pth", "legacy.pt", "model.safetensors"):
        check_weights_file(tmp_path / name, name=name)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"conv.weight": "not a tensor"}, tmp_path / "strings.pt")
    (tmp_path / "text.safetensors").write_text("not safetensors")
    with pytest.raises(ValueError, match=r"pretrained list: .*expected a state dict or a checkpoint dict, got list"):
        check_weights_file(tmp_path / "list.pt", name="list")
    with pytest.raises(ValueError, match=r"pretrained strings: .*not a state dict; non-tensor values .*conv\.weight"):
        check_weights_file(tmp_path / "strings.pt", name="strings")
    with pytest.raises(ValueError, match=r"pretrained text: .*text\.safetensors is not a safetensors file"):
        check_weights_file(tmp_path / "text.safetensors", name="text")
