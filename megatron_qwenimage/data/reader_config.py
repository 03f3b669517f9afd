"""Configuration of the training-data reader (the ``data:`` section of a run's YAML).

Every dataclass validates itself when constructed and raises `ConfigError` naming the field
(``data.stages[1].global_batch``...). `ReaderConfig.from_dict` builds the whole tree from the
plain mapping YAML gives and rejects unknown keys::

    data:
      seed: 1234
      tasks: {t2i: 0.8, edit: 0.15, i2i: 0.05}   # weight per task (omit a task to disable it)
      caches:
        - {path: /data/laion-latents, weight: 3.0, mode: tail}
        - {path: /data/edit-latents, weight: 1.0, pin: 7, tasks: [edit]}
      stages:                                     # curriculum, run in order
        - {name: s256, buckets: [256x256], micro_batch: 16, global_batch: 1024, steps: 20000}
        - {name: s640, buckets: [640x640, 480x832], micro_batch: 4, global_batch: 512, steps: 20000}
        - {name: s1328, buckets: [1328x1328], micro_batch: 1, global_batch: 256}  # no steps: forever
      validation: {path: /data/heldout, pin: 1, buckets: [640x640], samples_per_bucket: 32, micro_batch: 4}

Data-dependent checks (a bucket no cache has, too few samples for a global batch) happen when
the reader opens the caches; the data-parallel divisibility check in `ReaderConfig.check_dp`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from megatron_qwenimage.cache.shard_format import SAMPLE_KINDS, Bucket
from megatron_qwenimage.config import ConfigError

#: Training tasks. "i2i" (reconstruction) reuses t2i samples with the target as condition image.
TASKS = ("t2i", "edit", "i2i")
#: The kind of cached sample each task consumes (the ``task`` column of ``samples.parquet``, one of
#: the contract's `SAMPLE_KINDS`).
TASK_SAMPLE_KIND = {"t2i": "t2i", "i2i": "t2i", "edit": "edit"}
assert set(TASK_SAMPLE_KIND) == set(TASKS) and set(TASK_SAMPLE_KIND.values()) <= set(SAMPLE_KINDS)
#: How a cache's snapshot pin moves while training (see `CacheSource`).
CACHE_MODES = ("fixed", "grow", "tail")


def _check_int(where: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}={value!r}: expected an integer >= {minimum}")


def _check_positive_number(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}={value!r}: expected a positive finite number")


def _check_weights(where: str, weights: Mapping[str, Any]) -> None:
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"{where}={weights!r}: expected a non-empty mapping task -> weight")
    for task, w in weights.items():
        if task not in TASKS:
            raise ConfigError(f"{where}: unknown task {task!r}, expected some of {TASKS}")
        _check_positive_number(f"{where}.{task}", w)


def _parse_bucket(where: str, name: Any) -> str:
    """Canonical bucket name of `name`, or `ConfigError` naming `where`."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}={name!r}: expected a bucket name '<height>x<width>' in pixels")
    try:
        return Bucket.parse(name).name
    except ValueError as exc:  # ShardFormatError and ConfigError are both ValueErrors
        raise ConfigError(f"{where}={name!r}: {exc}") from exc


def _from_mapping(cls, d: Any, where: str, **converted: Any):
    """``cls(**d)`` with unknown keys and a non-mapping reported as `ConfigError` at `where`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - (names - {"where"}))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; {cls.__name__} has {sorted(names - {'where'})}")
    try:
        return cls(**{**d, **converted}, where=where) if "where" in names else cls(**{**d, **converted})
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class CacheSource:
    """One latent cache the reader draws from.

    Attributes:
        path: cache root (local directory or fsspec URL).
        weight: relative probability that a step (of a task this cache serves) draws from it.
        name: label used in logs, errors and the reader state (default: the path's last part);
            unique among the caches. Renaming a cache invalidates saved reader states.
        pin: snapshot version to start from (default: the newest at start).
        mode: "fixed": the pinned snapshot, repeated epoch after epoch;
            "grow": each epoch re-pins the newest snapshot and covers all of it;
            "tail": each sample once: every epoch covers only the shards committed since the
            previous epoch's snapshot, and when all is consumed the reader waits for a newer one.
        tasks: the tasks this cache serves ("edit" needs edit samples, "t2i"/"i2i" t2i samples).
    """

    path: str
    weight: float = 1.0
    name: str = ""
    pin: int | None = None
    mode: str = "fixed"
    tasks: tuple[str, ...] = ("t2i", "i2i")
    where: str = field(default="data.caches[?]", repr=False, compare=False)

    def __post_init__(self) -> None:
        w = self.where
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ConfigError(f"{w}.path={self.path!r}: expected a cache directory or URL")
        object.__setattr__(self, "path", os.fspath(self.path))
        if not self.name:
            object.__setattr__(self, "name", self.path.rstrip("/").rsplit("/", 1)[-1] or self.path)
        _check_positive_number(f"{w}.weight", self.weight)
        if self.pin is not None:
            _check_int(f"{w}.pin", self.pin, minimum=1)
        if self.mode not in CACHE_MODES:
            raise ConfigError(f"{w}.mode={self.mode!r}: expected one of {CACHE_MODES}")
        if isinstance(self.tasks, str) or not self.tasks:
            raise ConfigError(f"{w}.tasks={self.tasks!r}: expected a non-empty list of tasks from {TASKS}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"{w}.tasks: unknown task {t!r}, expected some of {TASKS}")


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage: a bucket set and batch sizes, for `steps` optimizer steps.

    Attributes:
        buckets: pixel bucket names ("640x640"); every step draws all its samples from one.
        micro_batch: samples per micro-batch (per forward/backward of one DP rank).
        global_batch: samples per optimizer step over all DP ranks.
        steps: optimizer steps of the stage; None (last stage only) runs until stopped.
        tasks: task weights for this stage (default: the reader's `tasks`).
    """

    name: str
    buckets: tuple[str, ...]
    micro_batch: int
    global_batch: int
    steps: int | None = None
    tasks: Mapping[str, float] | None = None
    where: str = field(default="data.stages[?]", repr=False, compare=False)

    def __post_init__(self) -> None:
        w = self.where
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{w}.name={self.name!r}: expected a non-empty string")
        if isinstance(self.buckets, str) or not self.buckets:
            raise ConfigError(f"{w}.buckets={self.buckets!r}: expected a non-empty list of bucket names")
        names = tuple(_parse_bucket(f"{w}.buckets[{i}]", b) for i, b in enumerate(self.buckets))
        if len(set(names)) != len(names):
            raise ConfigError(f"{w}.buckets={list(self.buckets)}: a bucket is listed twice")
        object.__setattr__(self, "buckets", names)
        _check_int(f"{w}.micro_batch", self.micro_batch, minimum=1)
        _check_int(f"{w}.global_batch", self.global_batch, minimum=1)
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"{w}.global_batch={self.global_batch} is not divisible by micro_batch={self.micro_batch}"
            )
        if self.steps is not None:
            _check_int(f"{w}.steps", self.steps, minimum=1)
        if self.tasks is not None:
            _check_weights(f"{w}.tasks", self.tasks)
            object.__setattr__(self, "tasks", dict(self.tasks))


@dataclass(frozen=True)
class ValidationConfig:
    """The held-out set: fixed micro-batches from one pinned snapshot.

    Attributes:
        path: cache root of the held-out data.
        pin: snapshot version (default: the newest when the reader opens; it is logged, and
            `ValidationReader.snapshot_version` reports it -- pin it for comparable runs).
        buckets: buckets to evaluate (default: every bucket of the snapshot).
        tasks: tasks to evaluate, each on its own micro-batches.
        samples_per_bucket: samples per (bucket, task), fewer if the snapshot has fewer.
        micro_batch: samples per validation micro-batch.
        seed: selects which samples are held out for evaluation.
    """

    path: str
    pin: int | None = None
    buckets: tuple[str, ...] | None = None
    tasks: tuple[str, ...] = ("t2i",)
    samples_per_bucket: int = 16
    micro_batch: int = 4
    seed: int = 0
    where: str = field(default="data.validation", repr=False, compare=False)

    def __post_init__(self) -> None:
        w = self.where
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ConfigError(f"{w}.path={self.path!r}: expected a cache directory or URL")
        object.__setattr__(self, "path", os.fspath(self.path))
        if self.pin is not None:
            _check_int(f"{w}.pin", self.pin, minimum=1)
        if self.buckets is not None:
            if isinstance(self.buckets, str) or not self.buckets:
                raise ConfigError(f"{w}.buckets={self.buckets!r}: expected a non-empty list or null")
            object.__setattr__(
                self, "buckets", tuple(_parse_bucket(f"{w}.buckets[{i}]", b) for i, b in enumerate(self.buckets))
            )
        if isinstance(self.tasks, str) or not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ConfigError(f"{w}.tasks={self.tasks!r}: expected a non-empty list of tasks from {TASKS}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        _check_int(f"{w}.samples_per_bucket", self.samples_per_bucket, minimum=1)
        _check_int(f"{w}.micro_batch", self.micro_batch, minimum=1)
        _check_int(f"{w}.seed", self.seed, minimum=0)


@dataclass(frozen=True)
class ReaderConfig:
    """The training-data reader: caches, curriculum, task mix, prefetch and tailing.

    Attributes:
        caches: the caches to mix (weights per step, see `CacheSource`).
        stages: curriculum stages, run in order (see `StageConfig`).
        tasks: task weights per step (positive; omit a task to disable it).
        seed: the global sample order is a function of the seed, the config and the snapshots.
        verify_checksums: re-hash each shard against its commit record when first opened.
        prefetch_steps: global steps loaded ahead by a background thread (0: load inline).
        text_length: pad every micro-batch's text to exactly this many tokens (static shapes for
            pipeline parallelism; a longer sample is an error); None pads to the longest.
        tail_poll_s: seconds between looks for a newer snapshot while a "tail" cache waits.
        tail_timeout_s: give up waiting after this many seconds (error naming the cache).
        max_open_shards: shards kept open (zarr handles) at once per process.
        validation: the held-out set, or None.
        replan_on_resume: accept a resumed reader state whose curriculum (stages, their buckets,
            batch sizes, lengths and task weights; caches, weights, modes, tasks) differs from this
            config: the step and stage counters and snapshot pins carry over, the epoch plans are
            rebuilt from this config (samples of the interrupted epochs may repeat or be skipped).
            False (default): such a resume is refused, naming what changed.
    """

    caches: tuple[CacheSource, ...]
    stages: tuple[StageConfig, ...]
    tasks: Mapping[str, float] = field(default_factory=lambda: {"t2i": 1.0})
    seed: int = 0
    verify_checksums: bool = True
    prefetch_steps: int = 2
    text_length: int | None = None
    tail_poll_s: float = 10.0
    tail_timeout_s: float = 3600.0
    max_open_shards: int = 64
    validation: ValidationConfig | None = None
    replan_on_resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.caches, (str, Mapping)) or not self.caches:
            raise ConfigError(f"data.caches={self.caches!r}: expected a non-empty list of caches")
        caches = tuple(
            c if isinstance(c, CacheSource) else _from_mapping(CacheSource, c, f"data.caches[{i}]")
            for i, c in enumerate(self.caches)
        )
        object.__setattr__(self, "caches", caches)
        names = [c.name for c in caches]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"data.caches: name(s) {dup} used twice; give each cache a unique `name`")
        if isinstance(self.stages, (str, Mapping)) or not self.stages:
            raise ConfigError(f"data.stages={self.stages!r}: expected a non-empty list of stages")
        stages = tuple(
            s if isinstance(s, StageConfig) else _from_mapping(StageConfig, s, f"data.stages[{i}]")
            for i, s in enumerate(self.stages)
        )
        object.__setattr__(self, "stages", stages)
        for i, s in enumerate(stages[:-1]):
            if s.steps is None:
                raise ConfigError(f"data.stages[{i}].steps: only the last stage may run without a step count")
        stage_names = [s.name for s in stages]
        if len(set(stage_names)) != len(stage_names):
            raise ConfigError(f"data.stages: stage names {stage_names} are not unique")
        _check_weights("data.tasks", self.tasks)
        object.__setattr__(self, "tasks", dict(self.tasks))
        for i, s in enumerate(stages):
            where = f"data.stages[{i}].tasks" if s.tasks is not None else "data.tasks"
            for task in self.task_weights(i):
                if not any(task in c.tasks for c in caches):
                    raise ConfigError(f"{where}: task {task!r} has a weight but no cache lists it in its `tasks`")
        _check_int("data.seed", self.seed, minimum=0)
        if not isinstance(self.verify_checksums, bool):
            raise ConfigError(f"data.verify_checksums={self.verify_checksums!r}: expected true or false")
        _check_int("data.prefetch_steps", self.prefetch_steps, minimum=0)
        if self.text_length is not None:
            _check_int("data.text_length", self.text_length, minimum=1)
        _check_positive_number("data.tail_poll_s", self.tail_poll_s)
        _check_positive_number("data.tail_timeout_s", self.tail_timeout_s)
        _check_int("data.max_open_shards", self.max_open_shards, minimum=1)
        if not isinstance(self.replan_on_resume, bool):
            raise ConfigError(f"data.replan_on_resume={self.replan_on_resume!r}: expected true or false")
        if self.validation is not None and not isinstance(self.validation, ValidationConfig):
            object.__setattr__(self, "validation", _from_mapping(ValidationConfig, self.validation, "data.validation"))

    def task_weights(self, stage: int) -> dict[str, float]:
        """The task weights in force during stage `stage` (index into `stages`)."""
        weights = self.stages[stage].tasks
        return dict(weights if weights is not None else self.tasks)

    def check_dp(self, dp_size: int) -> None:
        """Raise `ConfigError` unless every stage's global batch splits into whole micro-batches
        over `dp_size` data-parallel ranks (equal micro-batch counts per rank)."""
        _check_int("dp_size", dp_size, minimum=1)
        for i, s in enumerate(self.stages):
            if s.global_batch % (s.micro_batch * dp_size):
                raise ConfigError(
                    f"data.stages[{i}].global_batch={s.global_batch} is not divisible by "
                    f"micro_batch * dp_size = {s.micro_batch} * {dp_size}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReaderConfig:
        """Build from the ``data:`` mapping of a run config (unknown keys are errors)."""
        return _from_mapping(cls, d, "data")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ReaderConfig:
        """Read the ``data:`` section of a run's YAML file."""
        import yaml

        with open(path) as f:
            doc = yaml.safe_load(f) or {}
        if not isinstance(doc, Mapping) or "data" not in doc:
            raise ConfigError(f"{path}: no `data:` section")
        return cls.from_dict(doc["data"])

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping that `from_dict` accepts (for logging the resolved config)."""

        def strip(d: dict) -> dict:
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k != "where"}

        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["caches"] = [strip(dataclasses.asdict(c)) for c in self.caches]
        d["stages"] = [strip(dataclasses.asdict(s)) for s in self.stages]
        if self.validation is not None:
            d["validation"] = strip(dataclasses.asdict(self.validation))
        return d
