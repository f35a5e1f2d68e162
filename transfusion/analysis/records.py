"""The plain record of one finished job that every analysis reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class JobRecord:
    """A job's identity, final metrics, and where its stored artifacts are."""

    job_key: str
    run_id: str
    model: str
    init: str
    data_size: str
    seed: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    val_curve: tuple[tuple[int, float], ...] = ()
    probe_dir: Path | None = None
    predictions: Path | None = None  # test split scores (npz), for paired comparisons between runs
    source: str = ""  # the pretrained source transferred from: URI, accuracy, epochs ("" for none)
    source_weak: bool = False  # trained too briefly or too inaccurate to stand for ImageNet
    code_version: str = ""  # the code the run trained with (its code_version tag; "" when not recorded)
    block_shuffle: str = "none"  # block size of the fixed block shuffle of the job's images ("none": unshuffled)

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.model, self.init, self.data_size)


def source_of(init_label: str) -> str:
    """The source an init label names after ``@`` (``transfer@dino-resnet50``), or ``""``."""
    return init_label.split("@", 1)[1] if "@" in init_label else ""
