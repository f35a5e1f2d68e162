"""Where a run's code and environment came from: the code version, the image, the library versions.

Every job run and every grid parent run carries the tags :func:`provenance_tags` gives
(``code_version``, and ``image`` where ``$TRANSFUSION_IMAGE`` names one) and an
``environment.txt`` artifact, :func:`environment_report`: Python, torch with its CUDA and
cuDNN, the NVIDIA driver and GPU, Ray, Prefect, MLflow, and every installed distribution
(``pip freeze`` as read by :mod:`importlib.metadata`, without starting pip).

The code version is the package version (from the installed distribution, else the
``pyproject.toml`` of the checkout the package is imported from) with, from a git
checkout, a local part naming the commit and whether tracked files differ from it:
``0.1.0+g1a2b3c4.dirty``. A grid's ``identity.code`` decides how much of it enters
``job_key`` (:func:`code_identity`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "transfusion"
IMAGE_ENV = "TRANSFUSION_IMAGE"
CODE_VERSION_TAG = "code_version"
IMAGE_TAG = "image"
ENVIRONMENT_ARTIFACT = "environment.txt"
_CHECKOUT = Path(__file__).resolve().parent.parent
_GIT_TIMEOUT_S = 10


@dataclass(frozen=True)
class GitState:
    """The commit a checkout is at (7 hex digits) and whether tracked files differ from it."""

    commit: str
    dirty: bool


def git_state(root: Path = _CHECKOUT) -> GitState | None:
    """The checkout at ``root``'s commit and dirty flag; None outside a git checkout or without git."""
    if not (root / ".git").exists():  # a file in a worktree, a folder in a clone; absent in a wheel install
        return None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=_GIT_TIMEOUT_S
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=7", "HEAD")
        # Untracked files (caches, outputs) are not code the run used: only tracked changes make it dirty.
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return GitState(commit=commit, dirty=bool(changed))


def package_version(root: Path = _CHECKOUT) -> str:
    """The installed distribution's version, else the checkout's ``pyproject.toml`` version, else ``0+unknown``."""
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():  # a checkout on the path wins over an older installed copy of the package
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            pass
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def format_code_version(version: str, git: GitState | None) -> str:
    """``0.1.0``, or with a checkout's state ``0.1.0+g1a2b3c4`` / ``0.1.0+g1a2b3c4.dirty`` (PEP 440 local part)."""
    if git is None:
        return version
    return f"{version}+g{git.commit}{'.dirty' if git.dirty else ''}"


@functools.cache
def code_version() -> str:
    """This process's code version (computed once: a process does not change its code)."""
    return format_code_version(package_version(), git_state())


def code_identity(mode: str, version: str | None = None) -> str | None:
    """The part of a code version ``job_key`` covers under a grid's ``identity.code``.

    ``ignore``: None (upgrades retrain nothing); ``package``: the public version
    (``0.1.0``); ``commit``: the whole version, commit and dirty flag included.
    """
    version = version or code_version()
    if mode == "ignore":
        return None
    if mode == "package":
        return version.split("+", 1)[0]
    if mode == "commit":
        return version
    raise ValueError(f"identity.code must be one of ignore, package, commit; got {mode!r}")


def code_matches(recorded: str | None, wanted: str | None) -> bool:
    """Whether a run recorded as ``recorded`` (a whole code version) ran the code ``wanted`` names.

    ``wanted`` is what :func:`code_identity` gave: None matches anything, a public
    version matches every commit of it, a whole version only itself.
    """
    if wanted is None:
        return True
    if recorded is None:
        return False
    return wanted in (recorded, recorded.split("+", 1)[0])


def image() -> str | None:
    """The container image this process runs in, as the deployment names it in ``$TRANSFUSION_IMAGE``."""
    return os.environ.get(IMAGE_ENV) or None


def provenance_tags() -> dict[str, str]:
    """Tags every run carries: ``code_version`` and, where known, ``image``."""
    tags = {CODE_VERSION_TAG: code_version()}
    if image():
        tags[IMAGE_TAG] = image()
    return tags


def _version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_driver() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return driver.decode() if isinstance(driver, bytes) else str(driver)
    except Exception:  # no NVIDIA driver or no NVML: a CPU node
        return "none"


def _torch_lines() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["torch: not installed"]
    cuda = torch.version.cuda or "none (CPU build)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [f"torch: {torch.__version__}", f"CUDA (torch build): {cuda}", f"cuDNN: {cudnn or 'none'}"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"GPU: {', '.join(names)}")
    else:
        lines.append("GPU: none")
    return lines


def installed_distributions() -> list[str]:
    """``name==version`` of every installed distribution, sorted by name: what ``pip freeze`` lists."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(name.lower(), f"{name}=={dist.version}")
    return [found[name] for name in sorted(found)]


@functools.cache
def environment_report() -> str:
    """``environment.txt``: the versions a run's numbers depend on, then every installed distribution."""
    lines = [
        f"code_version: {code_version()}",
        f"image: {image() or 'not set ($' + IMAGE_ENV + ')'}",
        f"python: {sys.version.split()[0]} ({platform.python_implementation()}, {sys.executable})",
        f"platform: {platform.platform()}",
        *_torch_lines(),
        f"NVIDIA driver: {_nvidia_driver()}",
        f"ray: {_version_of('ray')}",
        f"prefect: {_version_of('prefect')}",
        f"mlflow: {_version_of('mlflow')}",
        "",
        "# installed distributions (pip freeze)",
        *installed_distributions(),
    ]
    return "\n".join(lines) + "\n"
