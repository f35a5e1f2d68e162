"""The state directory every part of the tool shares (prepared data, caches, local servers' stores)."""

from __future__ import annotations

import os
from pathlib import Path


def transfusion_home() -> Path:
    """``$TRANSFUSION_HOME``, default ``./.transfusion``, as an absolute path (workers
    started elsewhere must find the same folder)."""
    return Path(os.environ.get("TRANSFUSION_HOME", ".transfusion")).resolve()


def storage_path() -> str:
    """Where Ray Train keeps checkpoints and jobs' training state: ``$TRANSFUSION_STORAGE_PATH``
    (a folder or ``s3://``), else ``<home>/ray``."""
    return os.environ.get("TRANSFUSION_STORAGE_PATH") or str(transfusion_home() / "ray")
