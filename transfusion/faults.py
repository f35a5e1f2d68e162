"""Test-only fault injection: a job's loss turns NaN, or its worker is killed once.

Asked for by ``$TRANSFUSION_FAULT`` (comma-separated ``kind:field=value:step`` items,
e.g. ``nan:seed=1:2`` for a NaN loss at step 2 in the job of seed 1, or
``kill:seed=0:5`` to SIGKILL that job's worker once at step 5), carried to the worker
in the launch request, and applied by wrapping the loop's hooks in :class:`FaultInjection`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transfusion.config import JobSpec

FAULT_ENV = "TRANSFUSION_FAULT"


def injected_faults(spec: JobSpec, *, marker_dir: Path) -> dict[str, int | str]:
    """The faults ``$TRANSFUSION_FAULT`` asks of ``spec``'s job, as launch-request fields."""
    faults: dict[str, int | str] = {}
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, selector, step = item.split(":")
        key, value = selector.split("=")
        if str(getattr(spec, key)) != value:
            continue
        if kind == "nan":
            faults["fault_at_step"] = int(step)
        elif kind == "kill":
            faults["kill_at_step"] = int(step)
            marker = marker_dir / f"kill-{spec.job_key}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            faults["kill_marker"] = str(marker)
    return faults


class FaultInjection:
    """Test-only faults, as hooks wrapped around the real ones: the loss turns NaN at
    ``nan_at_step``, or this process is SIGKILLed once after ``kill_at_step`` (the
    ``kill_marker`` file, created just before, survives the restart)."""

    def __init__(
        self,
        hooks: Any,  # the real transfusion.train.TrainingHooks (not imported: train checks for these by shape)
        *,
        nan_at_step: int | None = None,
        kill_at_step: int | None = None,
        kill_marker: str | None = None,
    ) -> None:
        self.hooks = hooks
        self.nan_at_step, self.kill_at_step, self.kill_marker = nan_at_step, kill_at_step, kill_marker

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        self.hooks.log_metrics(metrics, step=step)

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        self.hooks.log_artifact(local_path, artifact_path)

    def checkpoint(self, state: dict[str, Any], *, step: int, metrics: dict[str, float]) -> None:
        self.hooks.checkpoint(state, step=step, metrics=metrics)

    def log_model(self, model: torch.nn.Module, *, input_example, metrics: dict[str, float], step: int) -> None:
        self.hooks.log_model(model, input_example=input_example, metrics=metrics, step=step)

    def corrupt_loss(self, loss: torch.Tensor, *, step: int) -> torch.Tensor:
        return loss * float("nan") if step == self.nan_at_step else loss

    def after_step(self, step: int) -> None:
        if step == self.kill_at_step and self.kill_marker and not os.path.exists(self.kill_marker):
            open(self.kill_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
