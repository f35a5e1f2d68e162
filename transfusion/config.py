"""Typed, validated specs of a training job and of a grid of jobs.

A :class:`GridSpec` is the cartesian product of models x inits x data sizes x seeds on
one dataset with shared training settings; each element is a :class:`JobSpec` with a
deterministic ``job_key``. Names are checked against the registries at the boundary,
so a typo fails before anything starts.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import json
import re
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from transfusion.data import DATASETS
from transfusion.data.block_shuffle import NO_SHUFFLE
from transfusion.inits import INITS, check_init_options
from transfusion.models import MODELS, canonical_model_name, model_facts, model_key_name
from transfusion.pretrained import source_for


def _positive_data_size(size: int | str) -> int | str:
    if size != "full" and size <= 0:
        raise ValueError(f"data_size must be 'full' or a positive integer, got {size}")
    return size


DataSize = Annotated[int | Literal["full"], AfterValidator(_positive_data_size)]

# Block size of the block-shuffle transform (pixels per block side) or "none" (no shuffle).
BlockShuffle = Annotated[int, Field(ge=1)] | Literal["none"]


def _registered(registry) -> AfterValidator:
    """Checks a name against ``registry``; an unknown one lists the valid names."""

    def check(name: str) -> str:
        registry.get(name)
        return name

    return AfterValidator(check)


def _enum_schema(names: list[str]) -> WithJsonSchema:
    # The JSON schema lists valid names, so a Prefect server rejects a bad grid
    # before any run; the Python validator gives the friendlier message.
    return WithJsonSchema({"type": "string", "enum": names})


# Source-neutral names of inits: ``transfer`` copies a source's weights whatever the
# source; ``imagenet`` stays the stored name, so grids run before the alias keep their keys.
INIT_ALIASES = {"transfer": "imagenet"}


def _canonical_init(name: Any) -> Any:
    return INIT_ALIASES.get(name, name) if isinstance(name, str) else name


def _canonical_model(name: Any) -> Any:
    return canonical_model_name(name) if isinstance(name, str) else name


# Old spellings (``inception_v3``) are read as the canonical one (``inception-v3``); the
# schema lists both so a Prefect server accepts a deployment written before the rename.
ModelName = Annotated[
    str,
    BeforeValidator(_canonical_model),
    _registered(MODELS),
    _enum_schema(sorted([*MODELS.names(), *MODELS.aliases()])),
]
_INIT_NAMES = sorted([*INITS.names(), *INIT_ALIASES])
InitName = Annotated[str, BeforeValidator(_canonical_init), _registered(INITS), _enum_schema(_INIT_NAMES)]
DatasetName = Annotated[str, _registered(DATASETS), _enum_schema(DATASETS.names())]


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices this process sees (0 without a driver); asked once per process."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(arg) for arg in typing.get_args(annotation))


class _Frozen(BaseModel):
    # inf/NaN pass no range check (``lr: .inf`` > 0) and only fail inside a job.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        # pydantic reads true as 1 in a number field: ``seeds: true`` would be one seed.
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if field is None or _accepts_bool(field.annotation):
                    continue
                if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
                    raise ValueError(f"{key}: expected a number, got {value!r}")
        return data


class TrainSettings(_Frozen):
    """Optimisation settings shared by every job of a grid."""

    steps: Annotated[int, Field(gt=0, description="optimiser steps")] = 200
    batch_size: Annotated[int, Field(gt=0)] = 32
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    eval_every: Annotated[int, Field(gt=0, description="steps between validations")] = 50
    checkpoint_every: Annotated[int, Field(ge=0, description="0: at each evaluation only")] = 0
    resolution: Annotated[int, Field(ge=8)] = 224
    eval_batch_size: Annotated[int, Field(gt=0)] = 128
    val_limit: Annotated[int, Field(ge=0, description="0: whole validation split")] = 0
    probe_size: Annotated[int, Field(ge=0, description="validation images in the probe set")] = 128
    probe_rows_per_channel: Annotated[
        int, Field(ge=1, description="conv maps: seeded (image, position) rows of the unpooled map per channel")
    ] = 10
    probe_seed: Annotated[int, Field(ge=0, description="seed of the probe's (image, position) rows")] = 0
    augment: bool = True
    threads: Annotated[int, Field(ge=0, description="torch threads per job, 0: auto")] = 0
    cpus_per_job: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_job: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        default="auto",
        validate_default=True,
        description="GPUs per Ray Train worker; auto: 1 when this machine has a CUDA device, else 0",
    )
    num_workers: Annotated[int, Field(ge=1, description="Ray Train workers (DDP) per job")] = 1
    max_failures: Annotated[int, Field(ge=0, description="Ray Train restarts per job")] = 1
    label_smoothing: Annotated[float, Field(ge=0, lt=1, description="multi-class sources only")] = 0.0
    select: Literal["last", "best-val"] = Field(
        default="last", description="test metrics of the last step, or of the step with the best validation AUC"
    )
    subset_seed: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="training subset drawn with this seed for every seed (None: each job's own seed)"
    )
    init_bn: Literal["recalibrate", "running"] = Field(
        default="recalibrate",
        description="batch-norm statistics of the step-0 probe and validation: recalibrated on training images "
        "in train mode (recalibrate), or the init's running statistics as they are (running); training is the same",
    )

    @field_validator("gpus_per_job")
    @classmethod
    def _resolve_auto_gpus(cls, value: float | str) -> float:
        # Resolved where the spec is validated (the driver), so every job, Ray's resource
        # request and train.py see a number; a remote cluster's GPUs are not visible here,
        # so grids for one set the number (the paper presets do).
        return float(cuda_device_count() > 0) if value == "auto" else float(value)


class WeakSourceSettings(_Frozen):
    """When a pretrained source counts as *weak*: labelled so on its runs, its registered version and reports."""

    min_epochs: Annotated[float, Field(ge=0, description="fewer passes over the source set: weak")] = 20.0
    min_top1: Annotated[float, Field(ge=0, le=1, description="lower top-1 on held-out source images: weak")] = 0.3


CodeIdentity = Literal["ignore", "package", "commit"]


class IdentitySettings(_Frozen):
    """What besides the experiment and its inputs' content makes a job new."""

    code: CodeIdentity = Field(
        default="ignore",
        description="ignore: an upgrade retrains nothing; package: a new package version retrains; "
        "commit: a new git commit (or uncommitted change) retrains",
    )


# Where and how robustly a job runs, not what it computes: excluded from ``job_key``.
# ``num_workers`` is here on purpose: the global batch and its sample sequence are the
# same for any number of DDP workers (each takes its share of every batch) and gradients
# are averaged, so only batch-norm statistics, computed per worker's share, differ -- as
# with any data-parallel run without SyncBN. Scaling a job out is placement, not a new
# experiment.
# A seed count beyond this is a typo (or a float read as one), not a grid anybody trains.
MAX_SEED_COUNT = 1000
PLACEMENT_FIELDS = ("threads", "cpus_per_job", "gpus_per_job", "num_workers", "max_failures", "eval_batch_size")

# What a job read, by content (JobSpec fields set once resolved): the run's identity tags.
IDENTITY_FIELDS = ("data_version", "weights_sha256", "code_version")

# The fields job_key version 1 hashed (all of them, placement included).
_V1_JOB_FIELDS = frozenset(
    {"model", "init", "init_options", "pretrained", "dataset", "dataset_source", "dataset_options", "data_size"}
    | {"seed", "train"}
)
_V1_TRAIN_FIELDS = frozenset(
    {"steps", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "warmup_steps", "eval_every"}
    | {"checkpoint_every", "resolution", "eval_batch_size", "val_limit", "probe_size", "probe_spatial", "augment"}
    | {"threads", "cpus_per_job", "gpus_per_job", "num_workers", "max_failures"}
)


# Fields version 1 had and later versions dropped, with the value they always had then.
# probe_spatial (conv maps pooled to s x s) gave way to sampled unpooled rows.
_V1_REMOVED_TRAIN_DEFAULTS = {"probe_spatial": 4}


def _short_hash(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Train settings added after grids had run: they enter job and grid keys only when set,
# so a grid that does not use them keeps its finished jobs and its parent run.
LATER_TRAIN_OPTIONS = {"select": "last", "subset_seed": None, "label_smoothing": 0.0}


# Train settings added after grids had run whose *earlier behaviour* is a value other
# than the default: a job at that value hashes as jobs did before the field existed (its
# finished runs are found), the default is a new experiment. ``init_bn`` changes no
# trained weight, but it does change what the run stores at step 0 (the probe that
# Figure 4's "at init" reads, and val/auc at step 0): a run that stored running-statistic
# probes is not a run of ``recalibrate``, so it is not reused as one.
EARLIER_TRAIN_BEHAVIOUR = {"init_bn": "running"}


def drop_unset_later_options(train: dict[str, Any]) -> dict[str, Any]:
    for name, default in LATER_TRAIN_OPTIONS.items():
        if train.get(name, default) == default:
            train.pop(name, None)
    return drop_earlier_behaviour(train)


def drop_earlier_behaviour(train: dict[str, Any]) -> dict[str, Any]:
    """Removes the :data:`EARLIER_TRAIN_BEHAVIOUR` fields that are at their earlier value."""
    for name, earlier in EARLIER_TRAIN_BEHAVIOUR.items():
        if name in train and train[name] == earlier:
            train.pop(name)
    return train


class JobSpec(_Frozen):
    """One training run: a model, an init, a data regime and a seed."""

    grid: str = "adhoc"
    model: ModelName
    init: InitName
    init_options: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = Field(default=None, description="weights for transfer inits: a source name or URI")
    dataset: DatasetName
    dataset_source: str | None = None
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    data_size: DataSize = "full"
    seed: Annotated[int, Field(ge=0)] = 0
    train: TrainSettings = TrainSettings()
    # What the job reads, by content; filled in once the grid's data and sources are resolved
    # (None: not resolved, and the job is keyed by the names as before).
    data_version: str | None = Field(default=None, description="the prepared data's version (content digest)")
    weights_sha256: str | None = Field(default=None, description="sha256 of the resolved pretrained weights")
    code_version: str | None = Field(default=None, description="code version in the key (grid identity.code)")
    block_shuffle: BlockShuffle = Field(
        default=NO_SHUFFLE, description="block size of the fixed block shuffle of every split, or 'none'"
    )

    @property
    def job_key(self) -> str:
        """Deterministic 16-hex-digit key of the experiment: what changes the job's results.

        Placement and fault policy (:data:`PLACEMENT_FIELDS`) and the grid's name are
        left out, so moving a finished grid from CPUs to GPUs, or raising
        ``max_failures`` for spot nodes, finds its runs instead of retraining them.
        Once resolved, the data's version replaces the dataset's source and options and
        the weights' sha256 replaces the source's name: re-pretraining a source or adding
        images under the same prefix gives new keys, while renaming either does not.
        """
        if self.data_version is None and self.weights_sha256 is None and self.code_version is None:
            return self.name_key
        payload = self._named_payload()
        if self.data_version is not None:
            del payload["dataset_source"], payload["dataset_options"]
            payload["data_version"] = self.data_version
        if self.weights_sha256 is not None:
            del payload["pretrained"]
            payload["weights_sha256"] = self.weights_sha256
        if self.code_version is not None:
            payload["code_version"] = self.code_version
        return _short_hash(payload)

    def _named_payload(self) -> dict:
        exclude = {"grid": True, "train": set(PLACEMENT_FIELDS), **dict.fromkeys(IDENTITY_FIELDS, True)}
        payload = self.model_dump(mode="json", exclude=exclude)
        payload["model"] = model_key_name(self.model)
        drop_earlier_behaviour(payload["train"])
        if payload.get("block_shuffle") == NO_SHUFFLE:  # jobs from before the axis keep their keys
            payload.pop("block_shuffle")
        return payload

    @property
    def name_key(self) -> str:
        """The key by names (source string, ``pretrained`` name) that versions before content identity wrote."""
        return _short_hash(self._named_payload())

    @property
    def identified(self) -> bool:
        """Whether the data version, and the weights' sha256 where the init reads a source, are resolved."""
        return self.data_version is not None and (self.pretrained is None or self.weights_sha256 is not None)

    @property
    def legacy_job_keys(self) -> tuple[str, ...]:
        """Keys earlier versions gave this job, so stores they wrote are found, not retrained.

        The key by names (before content identity), then version 1's: it hashed every
        field but ``grid``, placement included; a job with a field that version did not
        have, set away from what that version did (its default, or its
        :data:`EARLIER_TRAIN_BEHAVIOUR`), never had a v1 key. A run under any of these
        counts only when its recorded data version and weights match (:mod:`transfusion.identity`).
        """
        names = (self.name_key,) if self.name_key != self.job_key else ()
        return (*names, *self._v1_keys())

    def _v1_keys(self) -> tuple[str, ...]:
        payload = self.model_dump(mode="json", exclude={"grid", *IDENTITY_FIELDS})
        payload["model"] = model_key_name(self.model)
        defaults = JobSpec.model_construct(model=self.model, init=self.init, dataset=self.dataset).model_dump(
            mode="json", exclude=set(IDENTITY_FIELDS)
        )
        for field in set(payload) - _V1_JOB_FIELDS:
            if payload.pop(field) != defaults[field]:
                return ()
        then = {**defaults["train"], **EARLIER_TRAIN_BEHAVIOUR}
        for field in set(payload["train"]) - _V1_TRAIN_FIELDS:
            if payload["train"].pop(field) != then[field]:
                return ()
        payload["train"].update({k: v for k, v in _V1_REMOVED_TRAIN_DEFAULTS.items() if k not in payload["train"]})
        return (_short_hash(payload),)

    @property
    def lookup_keys(self) -> tuple[str, ...]:
        """``job_key`` first, then :attr:`legacy_job_keys`: every key a finished run of this job may carry."""
        return tuple(dict.fromkeys((self.job_key, *self.legacy_job_keys)))

    @property
    def init_label(self) -> str:
        """Init name as reports show it, e.g. ``transfusion(k=1)``.

        Transfer from anything but ImageNet is labelled by its source, so a run
        pretrained on procedural images never reads as "imagenet".
        """
        name, source = self.init, ""
        if name == "imagenet" and self.pretrained == "synthetic":
            name = "synthetic-transfer"
        elif self.pretrained not in (None, "imagenet"):
            name = "transfer" if name == "imagenet" else name
            source = f"@{self.source_label}"
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.init_options.items()))
        return f"{name}({opts}){source}" if opts else f"{name}{source}"

    @property
    def source_label(self) -> str | None:
        """Short name of the pretrained source (the ``source`` tag); None for source-free inits."""
        return source_label(self.pretrained) if self.pretrained else None

    @property
    def run_name(self) -> str:
        """``<model>-<init label>-<data size>[-b<block>]-s<seed>``: the MLflow and Prefect task-run name."""
        blocks = "" if self.block_shuffle == NO_SHUFFLE else f"-b{self.block_shuffle}"
        return f"{self.model}-{self.init_label}-{self.data_size}{blocks}-s{self.seed}"

    @property
    def block_shuffle_or_none(self) -> int | None:
        """The block size to shuffle by, or None when the images are left as they are."""
        return None if self.block_shuffle == NO_SHUFFLE else int(self.block_shuffle)

    @property
    def data_size_or_none(self) -> int | None:
        return None if self.data_size == "full" else int(self.data_size)


class InitChoice(_Frozen):
    """An init of a grid with its options, written ``name`` or ``{name: .., options: ..}``."""

    name: InitName
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value


# An init is written as its name or as {name, options}; the schema says both, so a
# server validating parameters accepts what the Python side accepts.
InitSpec = Annotated[
    InitChoice,
    WithJsonSchema({
        "anyOf": [
            {"type": "string", "enum": _INIT_NAMES},
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": _INIT_NAMES}, "options": {"type": "object"}},
                "required": ["name"],
                "additionalProperties": False,
            },
        ]
    }),
]  # fmt: skip


class GridSpec(_Frozen):
    """A grid: the cartesian product of models x inits x data sizes x seeds."""

    # "+" joins a variant's hash to its grid's name (``smoke+1a2b3c4d``, see :func:`variant_name`).
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")]
    dataset: DatasetName
    dataset_source: str | None = None
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    models: Annotated[list[ModelName], Field(min_length=1)]
    inits: Annotated[list[InitSpec], Field(min_length=1)]
    pretrained: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None,
        description="weights for transfer inits, one source or a list (the transfer inits expand over "
        "them): 'synthetic' (pretrain on procedural natural-like images), 'imagenet' (torchvision "
        "IMAGENET1K_V1), a registered source name (transfusion list), a path, s3://, https://, "
        "timm: or models:/ URI",
    )
    data_sizes: Annotated[list[DataSize], Field(min_length=1)] = ["full"]
    block_shuffle: Annotated[list[BlockShuffle], Field(min_length=1)] = Field(
        default=[NO_SHUFFLE],
        description="block sizes (pixels) of the fixed block shuffle applied to every split, each a divisor "
        "of train.resolution, or 'none' (Neyshabur et al. 2020: what is transferred?)",
    )
    seeds: Annotated[int, Field(ge=1, description="a seed count")] | list[Annotated[int, Field(ge=0)]] = [0]
    train: TrainSettings = TrainSettings()
    max_concurrent: Annotated[
        int, Field(ge=0, description="jobs at once; 0: what local CPUs/GPUs hold, all pending on a remote cluster")
    ] = 0
    max_retries: Annotated[int, Field(ge=0, description="re-runs of a FAILED job")] = 1
    # Analysis only (not in grid_key): the same trained grid can be re-analysed at another threshold.
    convergence_threshold: Annotated[
        float, Field(gt=0, le=1, description="Figure 5: validation AUC to reach (absolute) or fraction of the best")
    ] = 0.91
    convergence_mode: Literal["absolute", "relative"] = "absolute"
    interpolation_points: Annotated[
        int,
        Field(
            ge=0,
            description="Same basin?: alphas in [0, 1] at which weights between two runs are evaluated"
            " (0: no interpolation; else >= 3)",
        ),
    ] = 11
    interpolation_pairs: Annotated[
        int, Field(ge=1, description="Same basin?: at most this many pairs per kind in each (model, size, block)")
    ] = 3
    weak_source: WeakSourceSettings = WeakSourceSettings()
    identity: IdentitySettings = IdentitySettings()

    @field_validator("models", "inits", "data_sizes", "block_shuffle")
    @classmethod
    def _distinct(cls, values: list, info) -> list:
        # A repeated entry gives several concurrent jobs with one job_key.
        seen: list = []
        for value in values:
            if value in seen:
                shown = value.name if isinstance(value, InitChoice) and not value.options else value
                raise ValueError(f"{shown!r} is listed twice (entries must be distinct)")
            seen.append(value)
        return values

    @field_validator("interpolation_points")
    @classmethod
    def _a_path_between_ends(cls, points: int) -> int:
        if points in (1, 2):  # the ends alone: no path between them, so no barrier to see
            raise ValueError(f"interpolation_points must be 0 (off) or >= 3, got {points}")
        return points

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"seed count must be >= 1, got {value}")
            if value > MAX_SEED_COUNT:
                raise ValueError(f"seed count must be <= {MAX_SEED_COUNT}, got {value}")
            return list(range(value))
        return value

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("seeds must not be empty")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _fits_every_model(self) -> GridSpec:
        """Init options and the resolution checked against each model, before any job builds one."""
        for model in self.models:
            facts = model_facts(model)
            if self.train.resolution < facts.min_input_size:
                raise ValueError(
                    f"train.resolution {self.train.resolution} is below the minimum input size of {model} "
                    f"({facts.min_input_size} px)"
                )
            for init in self.inits:
                try:
                    check_init_options(init.name, init.options, stages=facts.stages)
                except ValueError as exc:
                    raise ValueError(f"inits: {exc} (model {model})") from None
        return self

    @model_validator(mode="after")
    def _blocks_fit_resolution(self) -> GridSpec:
        resolution = self.train.resolution
        for block in self.block_shuffle:
            if block != NO_SHUFFLE and (block > resolution or resolution % block):
                raise ValueError(
                    f"block_shuffle: {block} does not divide train.resolution {resolution}; "
                    f"use divisors of {resolution} or {NO_SHUFFLE!r}"
                )
        if NO_SHUFFLE in self.block_shuffle and resolution in self.block_shuffle:
            raise ValueError(
                f"block_shuffle: {resolution} (one block: the whole image) repeats {NO_SHUFFLE!r}; list one of them"
            )
        return self

    @model_validator(mode="after")
    def _sources_for_transfer(self) -> GridSpec:
        needing = [i.name for i in self.inits if init_needs_source(i.name)]
        if needing and not self.pretrained:
            raise ValueError(
                f"inits {needing} copy pretrained weights: set pretrained to 'synthetic', "
                "'imagenet', a registered source, a path, an s3:// URI or a models:/ URI"
            )
        sources = self.sources
        if len(set(sources)) != len(sources):
            raise ValueError(f"pretrained: a source is listed twice in {sources}")
        labels = [source_label(s) for s in sources]
        clash = sorted({label for label in labels if labels.count(label) > 1})
        if clash:
            raise ValueError(f"pretrained: sources {sources} share the label {clash[0]!r}; give files distinct names")
        for source in sources:
            if source.startswith(DOMAIN_PREFIX):
                domain_dataset(source)  # an unknown set lists the valid ones
        if needing:
            for source in sources:
                registered = source_for(source)
                unfit = [m for m in self.models if registered and not registered.fits(m)]
                if unfit:
                    raise ValueError(
                        f"pretrained: source {source!r} holds {registered.model} weights; it does not fit {unfit[0]}"
                    )
        return self

    @property
    def sources(self) -> list[str]:
        """The pretrained sources as a list (empty when the grid has none)."""
        if self.pretrained is None:
            return []
        return [self.pretrained] if isinstance(self.pretrained, str) else list(self.pretrained)

    def jobs(self) -> list[JobSpec]:
        """The grid's jobs, in a stable order (model, init, data size, block shuffle, seed)."""
        # Source-free inits run once; every other init runs once per source.
        init_sources = [
            (init, source)
            for init in self.inits
            for source in (self.sources if init_needs_source(init.name) else [None])
        ]
        return [
            JobSpec(
                grid=self.name,
                model=model,
                init=init.name,
                init_options=init.options,
                pretrained=source,
                dataset=self.dataset,
                dataset_source=self.dataset_source,
                dataset_options=self.dataset_options,
                data_size=size,
                seed=seed,
                train=self.train,
                block_shuffle=block,
            )
            for model, (init, source), size, block, seed in itertools.product(
                self.models, init_sources, self.data_sizes, self.block_shuffle, self.seeds
            )
        ]

    @property
    def grid_key(self) -> str:
        payload = self.model_dump(mode="json", exclude=ANALYSIS_ONLY_FIELDS)
        payload["models"] = [model_key_name(model) for model in self.models]
        drop_unset_later_options(payload["train"])
        if self.identity == IdentitySettings():  # set only by grids that opt in: older grids keep their parent run
            del payload["identity"]
        if payload.get("block_shuffle") == [NO_SHUFFLE]:  # grids from before the axis keep their parent run
            payload.pop("block_shuffle")
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Grid fields that change how a finished grid is analysed and labelled, not what is trained.
ANALYSIS_ONLY_FIELDS = {
    "convergence_threshold",
    "convergence_mode",
    "interpolation_points",
    "interpolation_pairs",
    "weak_source",
}


# ``--set`` keys that keep a grid's identity: how it is analysed, where and how robustly its
# jobs run. Overriding only these re-runs or re-analyses the grid itself, under its own name.
SAME_GRID_OVERRIDES = frozenset(
    {*ANALYSIS_ONLY_FIELDS, "name", "max_concurrent", "max_retries", *(f"train.{f}" for f in PLACEMENT_FIELDS)}
)
VARIANT_SEPARATOR = "+"


def variant_name(name: str, overrides: dict[str, Any]) -> str:
    """``<name>+<8 hex digits>``: the name of ``name`` changed by ``overrides`` ({dotted key: value}).

    The hash covers the overrides that change what is trained (not
    :data:`SAME_GRID_OVERRIDES`), in any order, so the same ``--set`` flags name the same
    variant every time and a variant never shares an experiment with its base grid.
    """
    changing = {key: value for key, value in overrides.items() if key not in SAME_GRID_OVERRIDES}
    if not changing:
        return name
    return f"{name}{VARIANT_SEPARATOR}{_short_hash(changing)[:8]}"


def _preset_names() -> list[str]:
    from transfusion.presets import PRESETS

    return PRESETS.names()


PresetName = Annotated[str, _enum_schema(_preset_names())]


# Inits that build weights without a pretrained source; every other init reads one.
SOURCE_FREE_INITS = frozenset({"random", "gabor"})


def init_needs_source(name: str) -> bool:
    return name not in SOURCE_FREE_INITS


DOMAIN_PREFIX = "domain:"


def domain_dataset(source: str) -> str:
    """The registered dataset of a ``domain:<dataset>`` source (unknown names list the valid ones)."""
    name = source.removeprefix(DOMAIN_PREFIX)
    DATASETS.get(name)
    return name


def source_label(pretrained: str) -> str:
    """How reports, run names and the ``source`` tag name a source: a registered name or
    ``synthetic``/``imagenet`` as written, ``models:/name/3`` as ``name-3``, a file by its stem."""
    if pretrained in ("synthetic", "imagenet") or source_for(pretrained):
        return pretrained
    if pretrained.startswith(DOMAIN_PREFIX):
        return f"domain-{pretrained.removeprefix(DOMAIN_PREFIX)}"
    if pretrained.startswith("models:/"):
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", pretrained.removeprefix("models:/")).strip("-")
    if pretrained.startswith("timm:"):
        return pretrained.removeprefix("timm:")
    name = PurePosixPath(urlparse(pretrained).path or pretrained).name
    for suffix in (".tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name) or "source"


def _field_paths(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = info.annotation if isinstance(info.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            paths[path] = nested  # a whole group at once: ``train={steps: 5, lr: 0.01}``
            paths.update(_field_paths(nested, f"{path}."))
        else:
            paths[path] = info.annotation
    return paths


def _only_lists(annotation: Any) -> bool:
    """Whether a field takes a list and nothing else (``None`` aside)."""
    if typing.get_origin(annotation) is Annotated:
        return _only_lists(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    return all(_only_lists(a) for a in options)


def grid_field_paths() -> list[str]:
    """Every field a grid file or ``--set`` can name, dotted: ``models``, ``train.steps``, ..."""
    return sorted(_field_paths(GridSpec))


def grid_list_fields() -> frozenset[str]:
    """Grid fields that take only a list, so one value given alone is read as a list of one."""
    return frozenset(path for path, annotation in _field_paths(GridSpec).items() if _only_lists(annotation))


# Mapping fields whose keys are free (each dataset or init types its own options).
FREE_MAPPING_FIELDS = frozenset({"dataset_options"})


def suggest_grid_field(key: str) -> str | None:
    """The valid grid field path nearest to a mistyped ``key`` (``train.stepz`` -> ``train.steps``), or None."""
    paths = grid_field_paths()
    close = difflib.get_close_matches(key, paths, n=1)
    if close:
        return close[0]
    # A field given without its group (``steps``) or mistyped in its last part only.
    by_leaf: dict[str, str] = {}
    for path in paths:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], path)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1)
    return by_leaf[close[0]] if close else None


def check_grid_field(key: str) -> None:
    """Raise a ValueError naming the nearest valid field when ``key`` is no grid field path."""
    paths = set(grid_field_paths())
    if key in paths or key.split(".", 1)[0] in FREE_MAPPING_FIELDS:
        return
    suggestion = suggest_grid_field(key)
    hint = f"did you mean {suggestion}?" if suggestion else "see the GridSpec fields in README.md"
    raise ValueError(f"unknown grid field {key!r}; {hint}")


def format_validation_error(error: ValidationError, *, where: str) -> str:
    """One line per problem, naming the field: ``where: field: message``."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and where.startswith(("grid", "preset")):
            suggestion = suggest_grid_field(loc)
            msg += f" (did you mean {suggestion}?)" if suggestion else ""
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}: " + "; ".join(parts)


def load_grid(ref: str | Path | dict | GridSpec) -> GridSpec:
    """A grid from a preset name, a YAML/JSON file path, a dict, or a GridSpec."""
    from transfusion.presets import PRESETS

    if isinstance(ref, GridSpec):
        return ref
    if isinstance(ref, dict):
        where, data = "grid", ref
    else:
        text_ref = str(ref)
        path = Path(text_ref)
        if text_ref in PRESETS:
            where, data = f"preset {text_ref!r}", PRESETS.get(text_ref)()
        elif path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
            if not path.is_file():
                raise ValueError(f"grid file {text_ref} does not exist")
            try:
                data = yaml.safe_load(path.read_text())
            except UnicodeDecodeError as exc:
                # A binary file under a grid's name (an image, an archive, a model).
                raise ValueError(
                    f"grid file {text_ref}: not a text YAML/JSON file (byte {exc.start} is not UTF-8)"
                ) from None
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                line = f" line {mark.line + 1}" if mark is not None else ""
                raise ValueError(f"grid file {text_ref}{line}: not valid YAML/JSON") from None
            if not isinstance(data, dict):
                raise ValueError(f"grid file {text_ref}: expected a mapping of grid fields")
            where = f"grid file {text_ref}"
        else:
            raise ValueError(
                f"{text_ref!r} is neither a grid preset ({', '.join(PRESETS.names())}) nor a .yaml/.json grid file"
            )
    try:
        return GridSpec.model_validate(data)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, where=where)) from None
