"""Training-state checkpoints of one job, kept under the storage path (a folder or ``s3://``).

Each run of a job owns ``<storage>/jobs/<grid>-<job_key>/<run_id>/``, so a job continues
from its latest state whichever process or Ray worker picks it up again: a restarted
worker after a crash, or a re-run of a grid whose flow process died (which continues the
same MLflow run). Objects are written whole
(to a temporary name, then renamed, on local disks), so a reader never sees half a state.
An object store that goes away for a while (a restart, a network blip) is waited for:
each upload, listing and read is retried with backoff (:func:`with_backoff`), so the job
carries on in the same run once the store is back, or fails after a bounded wait.
"""

from __future__ import annotations

import functools
import io
import os
import re
from dataclasses import dataclass
from typing import Any

import pyarrow.fs
import torch

from transfusion.object_store import s3_filesystem, with_backoff

STATE_NAME = re.compile(r"state-(\d{8})\.pt$")


def storage_filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path inside it) for a folder or ``s3://bucket/prefix``.

    S3 takes credentials from the usual AWS variables; only the endpoint of an
    S3-compatible server (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) is passed on.
    """
    if not path.startswith("s3://"):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    return s3_filesystem(), path.removeprefix("s3://")


@dataclass(frozen=True)
class JobCheckpoints:
    """The latest ``keep`` training states of one job."""

    storage_path: str
    job_name: str
    keep: int = 2

    @functools.cached_property
    def _location(self) -> tuple[pyarrow.fs.FileSystem, str]:
        filesystem, root = storage_filesystem(self.storage_path)
        return filesystem, f"{root.rstrip('/')}/jobs/{self.job_name}"

    def _steps(self) -> list[int]:
        filesystem, folder = self._location
        selector = pyarrow.fs.FileSelector(folder, allow_not_found=True)
        infos = with_backoff(lambda: filesystem.get_file_info(selector), what=f"list checkpoints in {folder}")
        names = (STATE_NAME.search(info.path) for info in infos)
        return sorted(int(m.group(1)) for m in names if m)

    def save(self, state: dict[str, Any], *, step: int) -> str:
        """Stores ``state`` as the state at ``step`` and drops all but the newest ``keep``."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        filesystem, folder = self._location
        target = f"{folder}/state-{step:08d}.pt"
        if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
            filesystem.create_dir(folder, recursive=True)
            partial = f"{target}.partial-{os.getpid()}"
            with filesystem.open_output_stream(partial) as stream:
                stream.write(buffer.getvalue())
            os.replace(partial, target)
        else:

            def upload() -> None:
                # An S3 object appears whole on close, so a retried upload just writes it again.
                filesystem.create_dir(folder, recursive=True)
                with filesystem.open_output_stream(target) as stream:
                    stream.write(buffer.getvalue())

            with_backoff(upload, what=f"upload checkpoint {target}")
        for old in self._steps()[: -self.keep] if self.keep > 0 else []:
            with_backoff(lambda old=old: filesystem.delete_file(f"{folder}/state-{old:08d}.pt"),
                         what=f"delete old checkpoint {folder}/state-{old:08d}.pt")  # fmt: skip
        return target

    def latest(self) -> dict[str, Any] | None:
        """The newest stored state, or None when the job has none yet."""
        filesystem, folder = self._location
        steps = self._steps()
        if not steps:
            return None
        path = f"{folder}/state-{steps[-1]:08d}.pt"

        def read() -> bytes:
            with filesystem.open_input_file(path) as stream:
                return stream.read()

        return torch.load(io.BytesIO(with_backoff(read, what=f"read checkpoint {path}")), map_location="cpu",
                          weights_only=True)  # fmt: skip
