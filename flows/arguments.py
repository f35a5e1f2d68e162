"""What the command line reads from its arguments: argparse types, ``--set`` overrides and the
grid they make. Every command module imports these from here (none from another command module).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import yaml


def parse_overrides(overrides: list[str]) -> dict[str, object]:
    """``train.steps=10`` style overrides as {dotted key: value}.

    Values are parsed as YAML and the last one of a key wins; a single value for a field
    that takes a list (``models=cbr-tiny``) is read as a list of one, so both spellings
    name the same variant.
    """
    from transfusion.config import grid_list_fields

    list_fields = grid_list_fields()
    parsed: dict[str, object] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set expects KEY=VALUE with KEY like train.steps, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"--set {item}: {raw!r} is not a valid YAML value (quote text with ':' or '[')") from None
        key = ".".join(parts)
        if key in list_fields and value is not None and not isinstance(value, list):
            value = [value]
        parsed.pop(key, None)
        parsed[key] = value
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``train.steps=10`` style overrides onto a grid mapping (values parsed as YAML).

    A key that is no grid field is refused with the nearest valid one.
    """
    from transfusion.config import check_grid_field

    data = dict(data)
    for item in overrides:
        ((key, value),) = parse_overrides([item]).items()  # the same one-line errors, in the order given
        parts = key.split(".")
        target = data
        for depth, part in enumerate(parts[:-1], start=1):
            inner = target.get(part)
            if inner is not None and not isinstance(inner, dict):
                where = ".".join(parts[:depth])
                raise ValueError(f"--set {item}: {where} is a value ({inner!r}), not a group of fields")
            target[part] = dict(inner or {})
            target = target[part]
        try:
            check_grid_field(key)
        except ValueError as exc:
            raise ValueError(f"--set {item}: {exc}") from None
        target[parts[-1]] = value
    return data


def port_number(text: str) -> int:
    """An argparse type: a TCP port 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {port}")
    return port


def _bounded_int(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what
    return parse


positive_int = _bounded_int(1, "an integer >= 1")
non_negative_int = _bounded_int(0, "an integer >= 0")
resolution_px = _bounded_int(8, "a resolution >= 8 px")


def _bounded_float(low: float, what: str, *, inclusive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what
    return parse


positive_float = _bounded_float(0.0, "a number > 0", inclusive=False)
non_negative_float = _bounded_float(0.0, "a number >= 0", inclusive=True)


def writable_directory(path: str) -> Path:
    """``path`` as a directory this process can write, created if missing."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {path} is a file, not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot create the directory ({exc.strerror})") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: the directory is not writable")
    return target


def load_grid_with_overrides(ref: str, overrides: list[str], *, name: str | None = None, announce: bool = True):
    """The grid ``ref`` with ``--set`` overrides; overrides that change what is trained make a variant.

    A variant is named ``<name>+<hash of the overrides>`` (:func:`transfusion.config.variant_name`)
    unless ``name`` (``--name``) is given, so it never mixes its runs with its base grid's;
    ``announce`` prints the name it got.
    """
    from transfusion.config import GridSpec, load_grid, variant_name

    grid = load_grid(ref)
    if overrides:
        grid = load_grid(apply_overrides(grid.model_dump(mode="json"), overrides))
    chosen = name or variant_name(grid.name, parse_overrides(overrides))
    if chosen != grid.name:
        grid = load_grid({**grid.model_dump(mode="json"), "name": chosen})
        if announce:
            how = "--name" if name else f"variant of {ref} with " + " ".join(overrides)
            # stdout: stderr is kept for progress and for the one line of an error found later.
            print(f"grid {chosen} ({how})", flush=True)
    return GridSpec.model_validate(grid.model_dump(mode="json"))


def warn_gpus_left_idle(grid) -> None:
    """One line when a grid asks for no GPU on a machine that has one."""
    from transfusion.config import cuda_device_count

    if grid.train.gpus_per_job == 0 and cuda_device_count():
        print(
            f"grid {grid.name}: train.gpus_per_job is 0 on a machine with {cuda_device_count()} CUDA device(s); "
            "jobs run on CPUs (train.gpus_per_job: auto uses them)",
            file=sys.stderr,
            flush=True,
        )
