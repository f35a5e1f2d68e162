"""The command line a newcomer reads: help on every option, one spelling per concept, tables
that fit 120 columns, examples and metadata files that load."""

from __future__ import annotations

import argparse
import json
import logging
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from flows.cli import (
    LOG_WIDTH,
    _subparsers,
    apply_overrides,
    build_parser,
    load_grid_with_overrides,
    main,
    pretrain_spellings,
    print_markdown_tables,
)
from transfusion.config import GridSpec, load_grid

ROOT = Path(__file__).resolve().parent.parent
# Old spellings kept for one release: hidden from --help on purpose.
DEPRECATED_OPTIONS = {"--data"}


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    parser = build_parser()
    return [(parser.prog, parser)] + [(child.prog, child) for child in _subparsers(parser)]


def test_every_option_of_every_command_has_help_text():
    missing = []
    for prog, parser in _parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if set(action.option_strings) & DEPRECATED_OPTIONS:
                assert action.help == argparse.SUPPRESS
                continue
            if not action.help:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    progs = {prog for prog, _ in _parsers()}
    assert {"transfusion run", "transfusion data prepare", "transfusion stack up", "transfusion list"} <= progs


@pytest.mark.parametrize("prog", [prog for prog, _ in _parsers()])
def test_help_has_no_restructuredtext_markup(prog):
    parser = dict(_parsers())[prog]
    text = parser.format_help()
    for markup in ("``", "::", ":class:", ":func:", ":data:", ":attr:"):
        assert markup not in text, f"{prog} --help shows {markup!r}"


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["run", "smoke"], False),
        (["-v", "run", "smoke"], True),
        (["run", "smoke", "-v"], True),
        (["run", "--verbose", "smoke"], True),
        (["data", "prepare", "folder", "--verbose"], True),
        (["stack", "up", "-v"], True),
        (["list", "-v"], True),
    ],
)
def test_verbose_works_before_or_after_the_command(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


# --- --set ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("train.stepz", "train.steps"), ("modles", "models"), ("stepz", "train.steps"), ("seed", "seeds")],
)
def test_set_of_a_mistyped_key_names_the_nearest_field(key, suggestion):
    with pytest.raises(ValueError, match=rf"unknown grid field '{re.escape(key)}'; did you mean {suggestion}\?"):
        apply_overrides(load_grid("smoke").model_dump(mode="json"), [f"{key}=3"])


def test_set_of_a_key_nothing_resembles_says_where_the_fields_are():
    with pytest.raises(ValueError, match=r"unknown grid field 'xyzzy'; see the GridSpec fields"):
        apply_overrides({}, ["xyzzy=1"])


def test_set_wraps_a_single_value_where_only_a_list_is_accepted():
    wrapped = load_grid_with_overrides("smoke", ["models=cbr-small", "data_sizes=100", "inits=gabor"])
    listed = load_grid_with_overrides("smoke", ["models=[cbr-small]", "data_sizes=[100]", "inits=[gabor]"])
    assert wrapped == listed
    assert wrapped.models == ["cbr-small"] and wrapped.data_sizes == [100]
    # Fields that take a single value as well keep its meaning: seeds=3 is a count, not [3].
    counted = load_grid_with_overrides("smoke", ["seeds=3", "pretrained=synthetic"])
    assert counted.seeds == [0, 1, 2] and counted.pretrained == "synthetic"


def test_set_takes_a_whole_group_of_fields():
    grid = load_grid_with_overrides("smoke", ["train={steps: 5, lr: 0.01}"])
    assert (grid.train.steps, grid.train.lr) == (5, 0.01)


def test_set_leaves_free_option_keys_to_the_dataset():
    data = apply_overrides({"dataset_options": {"a": 1}}, ["dataset_options.uncertainty=u-zeros"])
    assert data["dataset_options"] == {"a": 1, "uncertainty": "u-zeros"}


def test_a_grid_file_with_a_mistyped_field_names_the_nearest_one(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\ndataset: synthetic-retina\nmodels: [cbr-tiny]\ninits: [random]\nstepz: 3\n")
    with pytest.raises(ValueError, match=r"stepz: Extra inputs are not permitted \(did you mean train\.steps\?\)"):
        load_grid(str(path))


# --- model names ----------------------------------------------------------------------

# (old spelling, canonical spelling, job_key, v1 job key, grid_key) of the grid below, computed
# by the code before the rename: a finished run of either spelling is found by the other. That
# code had no ``init_bn``; its behaviour was ``running``, which the grid sets so the keys apply.
PINNED_KEYS = [
    ("inception_v3", "inception-v3", "856d69754738a104", "81f103812093abdb", "91021485c3085688"),
    ("convnext_tiny", "convnext-tiny", "d8f5509ae1a5eb1e", "8cc9a66b1e2ad13c", "38ffb789c7a2cf68"),
    ("vit_small_patch16_224", "vit-small-patch16-224", "a2e6b1199cd3b536", "2551de9e3d19d3b3", "519e6f04e6416083"),
    ("efficientnet_b0", "efficientnet-b0", "24ebd074a7868093", "d361406857bd29b1", "58a1e7c7b453f65f"),
    ("resnet-50", "resnet50", "65d0f680dad402b8", "30e80de4dd74f07a", "0ded085ae224dcfe"),
]


def _one_job_grid(model: str) -> GridSpec:
    return GridSpec(
        name="alias",
        dataset="synthetic-retina",
        models=[model],
        inits=["random"],
        seeds=[0],
        train={"resolution": 224, "init_bn": "running"},
    )


@pytest.mark.parametrize(("old", "canonical", "job_key", "v1_key", "grid_key"), PINNED_KEYS)
def test_old_and_canonical_model_names_share_every_key(old, canonical, job_key, v1_key, grid_key):
    for spelling in (old, canonical):
        grid = _one_job_grid(spelling)
        (job,) = grid.jobs()
        assert job.model == canonical
        assert job.lookup_keys == (job_key, v1_key)
        assert grid.grid_key == grid_key


def test_model_names_are_hyphenated_and_every_alias_names_a_registered_model():
    from transfusion.models import MODEL_ALIASES, MODELS, list_models, model_key_name

    assert all("_" not in name for name in list_models())
    for old, name in MODEL_ALIASES.items():
        assert name in list_models() and old not in list_models()
        assert MODELS.get(old) is MODELS.get(name)
    assert model_key_name("inception-v3") == model_key_name("inception_v3") == "inception_v3"
    assert model_key_name("cbr-tiny") == "cbr-tiny"


def test_an_old_and_a_new_spelling_of_one_model_are_one_entry():
    with pytest.raises(ValueError, match=r"models\.?.*'inception-v3' is listed twice"):
        load_grid({"name": "g", "dataset": "synthetic-retina", "models": ["inception_v3", "inception-v3"],
                   "inits": ["random"]})  # fmt: skip


def test_registered_pretraining_and_sources_accept_either_spelling():
    from tasks.pretraining import registered_name, standard_resolution
    from transfusion.pretrained import get_pretrained_source

    # Versions registered before the rename keep being found.
    assert registered_name("inception-v3", "imagenet") == registered_name("inception_v3", "imagenet")
    assert registered_name("inception-v3", "imagenet") == "transfusion-inception_v3-imagenet"
    assert standard_resolution("inception_v3") == standard_resolution("inception-v3") == 299
    source = get_pretrained_source("torchvision-inception_v3-imagenet1k-v1")
    assert source.model == "inception-v3" and source.fits("inception_v3") and source.fits("inception-v3")


# --- pretrain spellings ---------------------------------------------------------------


def _pretrain_args(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"pretrained": None, "source": None, "data": None, **given})


@pytest.mark.parametrize(
    ("given", "expected", "notices"),
    [
        ({}, ("synthetic", None), 0),
        ({"pretrained": "domain:chexpert", "source": "/d"}, ("domain:chexpert", "/d"), 0),
        ({"source": "domain:chexpert", "data": "/d"}, ("domain:chexpert", "/d"), 2),  # the old spellings
        ({"source": "/imagenet"}, ("/imagenet", None), 1),
        ({"pretrained": "domain:chexpert", "data": "/d"}, ("domain:chexpert", "/d"), 1),
    ],
)
def test_pretrain_reads_new_and_old_spellings(given, expected, notices, caplog):
    with caplog.at_level(logging.WARNING, logger="transfusion"):
        assert pretrain_spellings(_pretrain_args(**given)) == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "transfusion"]
    assert len(lines) == notices and all("deprecated" in line for line in lines)


# --- tables within 120 columns ----------------------------------------------------------


def test_list_shows_each_preset_with_its_description_and_job_count_within_120_columns(capsys):
    from transfusion.presets import PRESETS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= LOG_WIDTH
    for name in PRESETS.names():
        jobs = len(load_grid(name).jobs())
        assert re.search(rf"^ *{re.escape(name)} +{jobs} +\S", out, re.MULTILINE), name
    assert "README demo" in out and "inception-v3" in out


def test_list_json_holds_the_same_facts(capsys):
    from transfusion.models import list_models

    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    presets = {row["name"]: row for row in data["presets"]}
    assert presets["smoke"]["jobs"] == len(load_grid("smoke").jobs())
    assert presets["demo"]["description"]
    assert data["models"] == list_models()
    assert data["model_aliases"]["inception_v3"] == "inception-v3"
    assert {"inits", "datasets", "pretrained_sources"} <= set(data)


def test_result_tables_fit_120_columns_and_stay_pipe_tables(capsys):
    long_init = "transfusion(k=1)@torchvision-resnet50-imagenet1k-v1-" + "x" * 60
    text = (
        "### Results\n\n| model | init | data size | test AUC % |\n|---|---|---|---:|\n"
        f"| cbr-tiny | random | full | 93.1 ± 0.4 |\n| vit-small-patch16-224 | {long_init} | 5000 | 90.0 ± 1.0 |\n"
    )
    print_markdown_tables(text)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "### Results"
    assert max(len(line) for line in lines) <= LOG_WIDTH
    rows = [line for line in lines if line.startswith("| ")]
    assert rows[0].split("|")[1].strip() == "model"
    assert [cell.strip() for cell in rows[1].split("|")[1:5]] == ["cbr-tiny", "random", "full", "93.1 ± 0.4"]
    assert "".join(line.split("|")[2].strip() for line in rows[2:]) == long_init


def test_the_report_summary_prints_as_plain_paragraphs_within_120_columns(capsys):
    from flows.cli import print_summary, table_console

    cells = "; ".join(
        f"cbr-tiny at {n} images: transfer +{n / 100:.1f} AUC points [+0.1, +9.9]" for n in range(100, 900, 100)
    )
    print_summary(f"### Summary\n\nTransfer **helps** {cells}.\n\nWhat was run: grid demo.\n", table_console())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Summary" and max(len(line) for line in lines) <= LOG_WIDTH
    assert "**" not in "".join(lines) and "What was run: grid demo." in lines


# --- examples and metadata files --------------------------------------------------------


@pytest.mark.parametrize("name", ["eyepacs", "chexpert", "folder"])
def test_example_grid_loads_the_way_run_reads_it(name):
    from transfusion.data import RUNTIME_OPTIONS
    from transfusion.data.chexpert import CHEXPERT_OPTIONS
    from transfusion.data.folder import FOLDER_OPTIONS
    from transfusion.data.retina import RETINA_OPTIONS

    path = ROOT / "examples" / f"{name}.yaml"
    grid = load_grid_with_overrides(str(path), [])
    assert grid.jobs()
    assert "CHANGE" in path.read_text()  # says what to edit
    known = {"retina-eyepacs": RETINA_OPTIONS, "chexpert": CHEXPERT_OPTIONS, "folder": FOLDER_OPTIONS}
    assert set(grid.dataset_options) <= set(known[grid.dataset]) | set(RUNTIME_OPTIONS)
    assert grid.dataset_source, "an example names where the files are"


def test_examples_cover_eyepacs_chexpert_and_a_folder():
    datasets = {load_grid(str(p)).dataset for p in (ROOT / "examples").glob("*.yaml")}
    assert {"retina-eyepacs", "chexpert", "folder"} <= datasets


def test_citation_cff_parses_with_the_required_keys():
    data = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert {"cff-version", "message", "title", "authors"} <= set(data)
    paper = data["preferred-citation"]
    assert {"type", "title", "authors"} <= set(paper)
    assert [a["family-names"] for a in paper["authors"]] == ["Raghu", "Zhang", "Kleinberg", "Bengio"]
    assert paper["year"] == 2019 and "1902.07208" in json.dumps(paper)


def test_license_file_is_the_one_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (ROOT / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert (ROOT / "CITATION.cff").read_text().count("license: Apache-2.0") == 1
