"""The global sample order: which samples make up optimizer step k, decided before any is read.

The order is a pure function of the seed, the `ReaderConfig` and the cache snapshots; it never
depends on the number of data-parallel ranks (each rank later takes its contiguous slice of a
step's global batch, `StepPlan.rank_micro_batches`), nor on timing.

* Per step: ``rng(seed, step)`` draws the task from the stage's task weights, then a cache among
  those serving that task from the caches' weights.
* Per (cache, sample kind) *stream* ("t2i" samples feed the t2i and i2i tasks, "edit" samples
  the edit task), an *epoch plan*: the stream's samples in each bucket of the stage, permuted by
  ``rng(seed, cache, kind, stage, epoch)`` and cut into global batches (the remainder is dropped,
  or carried into the next epoch in tail mode), then the batches of all buckets shuffled
  together. A step takes the stream's next batch; every sample of a step shares one bucket.
* Epoch boundaries are where new data enters ("grow" and "tail" caches re-pin a newer
  snapshot there; see `CacheSource.mode`). A tail cache advances to the *smallest* snapshot
  version that yields a full batch, so the order depends on the snapshot history only.
* A stage switch starts a fresh epoch of every stream with the new stage's buckets and batch.

`Planner.state_dict` is small (counters, pins, cursors, tail leftovers) and JSON-serialisable;
plans are rebuilt from it on resume.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from megatron_qwenimage.cache.manifest import Cache, CacheError, Shard, Snapshot, open_cache
from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.data.agreement import RankAgreement, SingleProcess
from megatron_qwenimage.data.reader_config import TASK_SAMPLE_KIND, CacheSource, ReaderConfig
from megatron_qwenimage.errors import UserError

log = logging.getLogger(__name__)

STATE_FORMAT = 1
#: Domain tags that keep the step rng and the plan rng independent for equal counters.
_STEP_DOMAIN, _PLAN_DOMAIN = 0x5713, 0x9A11


class ReaderError(UserError, RuntimeError):
    """The data cannot feed the configured run (the message names the cache, stage, task)."""


class TailTimeoutError(ReaderError):
    """A tail cache had nothing new for `tail_timeout_s` (the message names the cache)."""


class EndOfData(ReaderError):
    """The curriculum's last stage has run all its steps."""


class ReaderStopped(Exception):
    """The reader was closed while the planner waited for data (internal)."""


class ReaderInterrupted(Exception):
    """The run asked to stop (SIGTERM on some rank) while the planner waited for a tail cache.

    Not an error of the data: the trainer saves what it has trained and stops as it does for a
    SIGTERM between steps. Raised on every rank alike (`CacheReader.next_global_step` agrees on it).
    """


def _never() -> bool:
    return False


def stable_tag(text: str) -> int:
    """A process-independent integer for `text` (seeds rngs per cache/kind/bucket name)."""
    return zlib.crc32(text.encode())


@dataclass(frozen=True, order=True)
class SampleRef:
    """One cached sample: row `row` of shard `shard_id`."""

    shard_id: str
    row: int


@dataclass(frozen=True)
class StepPlan:
    """The samples of one optimizer step, in global order.

    Attributes:
        step: global optimizer step (0-based, counted over all stages).
        stage, stage_name: curriculum stage index and name.
        task: "t2i" | "edit" | "i2i".
        cache: name of the cache the samples come from; snapshot_version: its pin.
        bucket: the bucket every sample belongs to.
        micro_batch: samples per micro-batch.
        refs: the global batch (`StageConfig.global_batch` samples).
    """

    step: int
    stage: int
    stage_name: str
    task: str
    cache: str
    snapshot_version: int
    bucket: str
    micro_batch: int
    refs: tuple[SampleRef, ...]

    def rank_micro_batches(self, dp_rank: int, dp_size: int) -> list[tuple[SampleRef, ...]]:
        """Rank `dp_rank`'s contiguous 1/dp_size of `refs`, cut into micro-batches in order.

        Concatenating the micro-batches of ranks 0..dp_size-1 gives `refs` back for any dp_size.
        """
        n = len(self.refs)
        if not 0 <= dp_rank < dp_size or n % (dp_size * self.micro_batch):
            raise ValueError(
                f"step {self.step}: cannot split {n} samples over rank {dp_rank} of {dp_size} "
                f"in micro-batches of {self.micro_batch}"
            )
        per_rank = n // dp_size
        mine = self.refs[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]


class CacheCatalog:
    """Snapshots, shards and per-row sample kinds of one cache, memoised (not thread-safe)."""

    def __init__(self, source: CacheSource) -> None:
        self.source = source
        try:
            self.cache: Cache = open_cache(source.path)
        except CacheError as exc:
            raise CacheError(f"cache {source.name!r}: {exc}") from exc
        self._snapshots: dict[int, Snapshot] = {}
        self._shards: dict[str, Shard] = {}
        self._kinds: dict[str, np.ndarray] = {}
        self._longest_text: dict[str, tuple[int, str]] = {}

    @property
    def name(self) -> str:
        return self.source.name

    def versions(self) -> list[int]:
        return self.cache.snapshot_versions()

    def snapshot(self, version: int) -> Snapshot | None:
        """Snapshot `version`; None for version 0 (a tail cache that has no snapshot yet)."""
        if version == 0:
            return None
        if version not in self._snapshots:
            snap = self.cache.snapshot(version)
            self._snapshots[version] = snap
            for s in snap.shards:
                self._shards.setdefault(s.shard_id, s)
        return self._snapshots[version]

    def shard_ids(self, version: int) -> set[str]:
        snap = self.snapshot(version)
        return set() if snap is None else {s.shard_id for s in snap.shards}

    def shard(self, shard_id: str) -> Shard:
        if shard_id not in self._shards:
            for v in reversed(self.versions()):
                self.snapshot(v)
                if shard_id in self._shards:
                    break
            else:
                raise ReaderError(f"cache {self.name!r} ({self.source.path}): no snapshot lists shard {shard_id}")
        return self._shards[shard_id]

    def kinds(self, shard_id: str) -> np.ndarray:
        """``task`` column of the shard's samples table: the kind ("t2i"/"edit") of each row."""
        if shard_id not in self._kinds:
            shard = self.shard(shard_id)
            try:
                kinds = np.asarray(shard.samples.column("task").to_pylist(), dtype=object)
            except Exception as exc:  # unreadable table: a checksum mismatch says why, else say which shard
                shard.verify()  # ShardChecksumError naming the shard and file when the bytes changed
                raise ReaderError(
                    f"cache {self.name!r}: cannot read the samples table of shard {shard_id} ({shard.path}): {exc}"
                ) from exc
            if len(kinds) != shard.num_samples:
                raise ReaderError(
                    f"cache {self.name!r}: shard {shard_id} lists {len(kinds)} samples, "
                    f"its commit record {shard.num_samples}"
                )
            self._kinds[shard_id] = kinds
        return self._kinds[shard_id]

    def longest_text(self, shard_id: str) -> tuple[int, str]:
        """``(text_len, sample_id)`` of the shard's sample with the most text tokens."""
        if shard_id not in self._longest_text:
            shard = self.shard(shard_id)
            try:
                table = shard.samples
                lengths = np.asarray(table.column("text_len").to_pylist(), dtype=np.int64)
                ids = table.column("sample_id").to_pylist()
            except Exception as exc:
                shard.verify()
                raise ReaderError(
                    f"cache {self.name!r}: cannot read the samples table of shard {shard_id} ({shard.path}): {exc}"
                ) from exc
            i = int(np.argmax(lengths)) if len(lengths) else 0
            self._longest_text[shard_id] = (int(lengths[i]), str(ids[i])) if len(lengths) else (0, "")
        return self._longest_text[shard_id]

    def check_text_length(self, version: int, buckets: set[str], text_length: int | None) -> None:
        """Refuse snapshot `version` if a sample of `buckets` has more than `text_length` text tokens.

        Raises:
            ConfigError: naming the longest such sample, its shard and token count, and the fix.
        """
        snap = self.snapshot(version)
        if text_length is None or snap is None:
            return
        longest = (0, "", "")
        for shard in snap.shards:
            if shard.bucket.name in buckets:
                n, sample_id = self.longest_text(shard.shard_id)
                if n > longest[0]:
                    longest = (n, sample_id, shard.shard_id)
        if longest[0] > text_length:
            n, sample_id, shard_id = longest
            raise ConfigError(
                f"data.text_length={text_length}: cache {self.name!r} ({self.source.path}) snapshot v{version} "
                f"holds sample {sample_id} (shard {shard_id}) with {n} text tokens; set data.text_length to at "
                f"least {n} (producers keep up to 1024), or leave it unset to pad each step to its longest "
                "sample (schedule.text_pad_multiple bounds the number of shapes)"
            )

    def bucket_of(self, shard_id: str) -> str:
        return self.shard(shard_id).bucket.name

    def candidates(
        self, version: int, base: int | None, kind: str, buckets: tuple[str, ...], carried: list[SampleRef]
    ) -> dict[str, list[SampleRef]]:
        """Samples of `kind` in `buckets`: shards of snapshot `version` not in snapshot `base`
        (all of them when `base` is None), plus `carried`; per bucket, sorted."""
        snap = self.snapshot(version)
        skip = self.shard_ids(base) if base is not None else set()
        out: dict[str, list[SampleRef]] = {b: [] for b in buckets}
        for shard in snap.shards if snap is not None else []:
            b = shard.bucket.name
            if b not in out or shard.shard_id in skip:
                continue
            rows = np.nonzero(self.kinds(shard.shard_id) == kind)[0]
            out[b].extend(SampleRef(shard.shard_id, int(r)) for r in rows)
        for ref in carried:
            b = self.bucket_of(ref.shard_id)
            if b in out:
                out[b].append(ref)
        return {b: sorted(refs) for b, refs in out.items()}


@dataclass
class EpochPlan:
    """One epoch of a stream: `len(self)` global batches, each from one bucket.

    Samples are stored as two int arrays in consumption order (8 bytes per sample), so plans over
    millions of samples stay small.
    """

    global_batch: int
    buckets: list[str]  # bucket of each group
    shard_ids: list[str]
    shard_index: np.ndarray  # int32 [groups * global_batch] index into shard_ids
    rows: np.ndarray  # int32 [groups * global_batch]
    leftover: list[SampleRef]  # samples that did not fill a global batch
    counts: dict[str, int]  # candidate samples per bucket

    def __len__(self) -> int:
        return len(self.buckets)

    def group(self, i: int) -> tuple[str, tuple[SampleRef, ...]]:
        lo, hi = i * self.global_batch, (i + 1) * self.global_batch
        refs = tuple(SampleRef(self.shard_ids[s], int(r)) for s, r in zip(self.shard_index[lo:hi], self.rows[lo:hi]))
        return self.buckets[i], refs


def build_epoch_plan(candidates: dict[str, list[SampleRef]], global_batch: int, rng: np.random.Generator) -> EpochPlan:
    """Permute each bucket's candidates, cut them into global batches, shuffle the batches."""
    shard_ids = sorted({r.shard_id for refs in candidates.values() for r in refs})
    index = {s: i for i, s in enumerate(shard_ids)}
    groups: list[tuple[str, list[SampleRef]]] = []
    leftover: list[SampleRef] = []
    for bucket in sorted(candidates):
        refs = candidates[bucket]
        perm = rng.permutation(len(refs))
        full = len(refs) // global_batch * global_batch
        groups += [(bucket, [refs[j] for j in perm[i : i + global_batch]]) for i in range(0, full, global_batch)]
        leftover += [refs[j] for j in perm[full:]]
    order = rng.permutation(len(groups))
    flat = [r for i in order for r in groups[i][1]]
    return EpochPlan(
        global_batch=global_batch,
        buckets=[groups[i][0] for i in order],
        shard_ids=shard_ids,
        shard_index=np.asarray([index[r.shard_id] for r in flat], dtype=np.int32),
        rows=np.asarray([r.row for r in flat], dtype=np.int32),
        leftover=sorted(leftover),
        counts={b: len(refs) for b, refs in sorted(candidates.items())},
    )


@dataclass
class StreamState:
    """Position of one (cache, sample kind) stream.

    Attributes:
        stage: the curriculum stage the current epoch was planned for.
        epoch: epochs of this stream so far (over the whole run).
        pin: snapshot version the current epoch draws from.
        base_pin: tail caches: the epoch covers `pin`'s shards that are not in `base_pin`
            (None: all of `pin`).
        carried: tail caches: samples left over from the previous epoch, added to this one.
        cursor: global batches of the current epoch already taken.
    """

    stage: int
    epoch: int
    pin: int
    base_pin: int | None = None
    carried: list[SampleRef] = field(default_factory=list)
    cursor: int = 0

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "epoch": self.epoch,
            "pin": self.pin,
            "base_pin": self.base_pin,
            "carried": [[r.shard_id, r.row] for r in self.carried],
            "cursor": self.cursor,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(
            d["stage"], d["epoch"], d["pin"], d["base_pin"], [SampleRef(s, r) for s, r in d["carried"]], d["cursor"]
        )

    def plan_key(self) -> tuple:
        return (self.stage, self.epoch, self.pin, self.base_pin, tuple(self.carried))


class Planner:
    """Draws `StepPlan`s one optimizer step at a time (the reader's loader thread owns it).

    Args:
        config: the reader config.
        catalogs: one `CacheCatalog` per `config.caches` entry, by name.
        stop: set to interrupt a tail wait (raises `ReaderStopped`).
        clock: monotonic seconds, for the tail timeout.

    Attributes:
        interrupt: polled before each look for a newer snapshot while a tail cache waits (every
            ``tail_poll_s``); when it returns True the wait ends with `ReaderInterrupted`. The
            trainer sets it to "some rank has a stop request" (`CacheReader.set_interrupt`).
    """

    def __init__(
        self,
        config: ReaderConfig,
        catalogs: dict[str, CacheCatalog],
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        agreement: RankAgreement | None = None,
        visibility_lag: int = 1,
    ) -> None:
        self.config = config
        self.catalogs = catalogs
        self.stop = stop or threading.Event()
        self.interrupt: Callable[[], bool] = _never
        self.clock = clock
        self.agreement = agreement or SingleProcess()
        self.step = 0
        self.stage = 0
        self.step_in_stage = 0
        # Pins are decided once, on rank 0, and shared: a snapshot published while ranks start
        # must not put peers on different samples.
        self.pins = self.agreement.broadcast({c.name: self._initial_pin(c) for c in config.caches})
        #: ``grow`` re-pins: the newest snapshot versions all ranks agreed were visible, by step
        #: (`record_visibility`); a re-pin planned at step t uses the record of step t - lag.
        self.visibility_lag = visibility_lag
        self._visibility: dict[int, dict[str, int]] = {-1: dict(self.pins)}
        self._visibility_changed = threading.Condition()
        self.streams: dict[str, StreamState] = {}
        self._plans: dict[str, tuple[tuple, EpochPlan]] = {}
        self._check_buckets()
        for c in config.caches:  # before step 0: a too-long sample would otherwise fail mid-training
            self.catalogs[c.name].check_text_length(self.pins[c.name], self._all_buckets, config.text_length)

    @property
    def _all_buckets(self) -> set[str]:
        return {b for stage in self.config.stages for b in stage.buckets}

    # ------------------------------------------------------------------ setup
    def _initial_pin(self, source: CacheSource) -> int:
        catalog = self.catalogs[source.name]
        if source.pin is not None:
            catalog.snapshot(source.pin)  # CacheError naming the cache if it does not exist
            return source.pin
        versions = catalog.versions()
        if versions:
            return versions[-1]
        if source.mode == "tail":
            log.info("cache %r (%s) has no snapshot yet; the reader will wait for one", source.name, source.path)
            return 0
        raise CacheError(
            f"cache {source.name!r} ({source.path}) has no manifest snapshot; a producer run writes "
            "one (or set mode: tail to wait for it)"
        )

    def _check_buckets(self) -> None:
        """Every stage bucket must exist in some cache's pinned snapshot, unless a cache tails."""
        if any(c.mode == "tail" for c in self.config.caches):
            return
        have: dict[str, list[str]] = {}
        for c in self.config.caches:
            for b in self.catalogs[c.name].snapshot(self.pins[c.name]).samples_per_bucket():
                have.setdefault(b, []).append(c.name)
        for i, stage in enumerate(self.config.stages):
            for j, b in enumerate(stage.buckets):
                if b not in have:
                    raise ConfigError(
                        f"data.stages[{i}].buckets[{j}]={b!r}: no cache has this bucket "
                        f"(buckets present: {sorted(have)})"
                    )

    # ------------------------------------------------------------------ stepping
    def next_step(self) -> StepPlan:
        """The next optimizer step's samples (may wait for data in tail mode)."""
        stages = self.config.stages
        while stages[self.stage].steps is not None and self.step_in_stage >= stages[self.stage].steps:
            if self.stage + 1 == len(stages):
                raise EndOfData(f"the curriculum is finished: {self.step} steps over {len(stages)} stage(s)")
            self.stage += 1
            self.step_in_stage = 0
            log.info(
                "data: step %d enters stage %r (buckets %s, global batch %d)",
                self.step,
                stages[self.stage].name,
                list(stages[self.stage].buckets),
                stages[self.stage].global_batch,
            )
        stage = stages[self.stage]
        rng = np.random.default_rng([self.config.seed, _STEP_DOMAIN, self.step])
        weights = self.config.task_weights(self.stage)
        tasks = sorted(weights)
        task = tasks[_choose(rng, [weights[t] for t in tasks])]
        eligible = [c for c in self.config.caches if task in c.tasks]
        source = eligible[_choose(rng, [c.weight for c in eligible])]
        kind = TASK_SAMPLE_KIND[task]
        stream, plan = self._stream_with_data(source, kind)
        bucket, refs = plan.group(stream.cursor)
        stream.cursor += 1
        out = StepPlan(
            self.step, self.stage, stage.name, task, source.name, stream.pin, bucket, stage.micro_batch, refs
        )
        self.step += 1
        self.step_in_stage += 1
        return out

    def _plan(self, source: CacheSource, kind: str, stream: StreamState) -> EpochPlan:
        key = f"{source.name}/{kind}"
        memo = self._plans.get(key)
        if memo is not None and memo[0] == stream.plan_key():
            return memo[1]
        stage = self.config.stages[stream.stage]
        # A re-pinned snapshot (grow / tail) is checked when it enters, before any of it is read.
        self.catalogs[source.name].check_text_length(stream.pin, self._all_buckets, self.config.text_length)
        cands = self.catalogs[source.name].candidates(stream.pin, stream.base_pin, kind, stage.buckets, stream.carried)
        rng = np.random.default_rng(
            [self.config.seed, _PLAN_DOMAIN, stable_tag(source.name), stable_tag(kind), stream.stage, stream.epoch]
        )
        plan = build_epoch_plan(cands, stage.global_batch, rng)
        self._plans[key] = (stream.plan_key(), plan)
        return plan

    def _stream_with_data(self, source: CacheSource, kind: str) -> tuple[StreamState, EpochPlan]:
        """The stream's state and plan with at least one batch left, starting epochs as needed."""
        key = f"{source.name}/{kind}"
        stream = self.streams.get(key)
        if stream is None or stream.stage != self.stage:
            pin = stream.pin if stream is not None else self.pins[source.name]
            if source.mode == "grow":
                pin = max(pin, self.visible_version(source.name, self.step))
            stream = StreamState(self.stage, stream.epoch + 1 if stream is not None else 0, pin)
            self.streams[key] = stream
        plan = self._plan(source, kind, stream)
        if stream.cursor < len(plan):
            return stream, plan
        fresh = stream.cursor == 0
        if source.mode == "tail":
            self._advance_tail(source, kind, stream, plan)
        else:
            if source.mode == "grow" and not fresh:
                stream.pin = max(stream.pin, self.visible_version(source.name, self.step))
            if not fresh:
                stream.epoch += 1
                stream.cursor = 0
            plan = self._plan(source, kind, stream)
            if not len(plan):
                stage = self.config.stages[self.stage]
                raise ReaderError(
                    f"cache {source.name!r} ({source.path}) snapshot v{stream.pin}: not one full global batch of "
                    f"{stage.global_batch} {kind!r} samples in any bucket of stage {stage.name!r} "
                    f"(samples per bucket: {plan.counts}); lower global_batch, drop the task from the cache's "
                    "`tasks`, or add data"
                )
            log.info(
                "data: cache %r %s samples: epoch %d over snapshot v%d (%d steps)",
                source.name,
                kind,
                stream.epoch,
                stream.pin,
                len(plan),
            )
        return stream, self._plan(source, kind, stream)

    def _advance_tail(self, source: CacheSource, kind: str, stream: StreamState, done: EpochPlan) -> None:
        """Move a tail stream to the smallest newer snapshot that adds a full batch; wait if none."""
        catalog = self.catalogs[source.name]
        stage = self.config.stages[self.stage]
        deadline = self.clock() + self.config.tail_timeout_s
        checked, waiting = stream.pin, False
        while True:
            for v in (v for v in catalog.versions() if v > checked):
                candidate = StreamState(self.stage, stream.epoch + 1, v, stream.pin, list(done.leftover))
                if len(self._plan(source, kind, candidate)):
                    stream.epoch, stream.pin, stream.base_pin = candidate.epoch, v, candidate.base_pin
                    stream.carried, stream.cursor = candidate.carried, 0
                    log.info(
                        "data: tail cache %r %s samples: epoch %d over snapshot v%d (new since v%s)%s",
                        source.name,
                        kind,
                        stream.epoch,
                        v,
                        candidate.base_pin,
                        " -- resuming after the wait" if waiting else "",
                    )
                    return
                checked = v
            remaining = deadline - self.clock()
            what = (
                f"cache {source.name!r} ({source.path}): every {kind!r} sample of stage {stage.name!r} "
                f"(buckets {list(stage.buckets)}) committed up to snapshot v{checked} is consumed"
            )
            if remaining <= 0:
                raise TailTimeoutError(
                    f"{what}, and no newer snapshot brought a full global batch of "
                    f"{stage.global_batch} within tail_timeout_s={self.config.tail_timeout_s}s"
                )
            if not waiting:  # the expected state of a run that tails its producers (data wait shows it)
                log.info(
                    "%s; waiting for a newer snapshot (polling every %ss, timeout %ss)",
                    what,
                    self.config.tail_poll_s,
                    self.config.tail_timeout_s,
                )
                waiting = True
            if self.interrupt():
                raise ReaderInterrupted(
                    f"{what}; a stop was requested while waiting for a newer snapshot (step {self.step})"
                )
            if self.stop.wait(min(self.config.tail_poll_s, remaining)):
                raise ReaderStopped()

    # ------------------------------------------------------------------ rank agreement
    @property
    def has_growing_caches(self) -> bool:
        return any(c.mode == "grow" for c in self.config.caches)

    def newest_versions(self) -> dict[str, int]:
        """This rank's view of each ``grow`` cache's newest snapshot version (0: none)."""
        return {c.name: (self.catalogs[c.name].versions() or [0])[-1] for c in self.config.caches if c.mode == "grow"}

    def record_visibility(self, step: int, versions: dict[str, int]) -> None:
        """Record the versions every rank agreed are visible once step `step` was consumed."""
        with self._visibility_changed:
            self._visibility[step] = dict(versions)
            self._visibility_changed.notify_all()

    def visible_version(self, cache: str, step: int) -> int:
        """The newest version of ``grow`` cache `cache` that a re-pin planned at `step` may use.

        It is the agreed record of step ``step - visibility_lag`` (the newest record at or
        before it): every rank plans step `step` from the same record, however far its prefetch
        thread runs ahead. Waits (interruptibly) while the consumer has not recorded that step yet.
        """
        want = step - self.visibility_lag
        with self._visibility_changed:
            while max(self._visibility) < want:
                if self.stop.is_set():
                    raise ReaderStopped()
                self._visibility_changed.wait(timeout=0.1)
            key = (
                max(k for k in self._visibility if k <= want)
                if any(k <= want for k in self._visibility)
                else min(self._visibility)
            )
            return self._visibility[key].get(cache, self.pins.get(cache, 0))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "seed": self.config.seed,
            "step": self.step,
            "stage": self.stage,
            "step_in_stage": self.step_in_stage,
            "pins": dict(self.pins),
            "streams": {k: s.to_dict() for k, s in sorted(self.streams.items())},
            "curriculum": curriculum(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ReaderError(
                f"reader state: expected a dict with format {STATE_FORMAT}, got "
                f"{state.get('format') if isinstance(state, dict) else type(state).__name__}"
            )
        if state["seed"] != self.config.seed:
            raise ReaderError(
                f"reader state was saved with data.seed={state['seed']}, the config has "
                f"{self.config.seed}; the sample order would not continue"
            )
        if set(state["pins"]) != set(self.pins):
            raise ReaderError(f"reader state has caches {sorted(state['pins'])}, the config {sorted(self.pins)}")
        if not 0 <= state["stage"] < len(self.config.stages):
            raise ReaderError(
                f"reader state is in stage {state['stage']}; the config has {len(self.config.stages)} stage(s)"
            )
        changes = curriculum_changes(state.get("curriculum"), curriculum(self.config))
        if changes and not self.config.replan_on_resume:
            raise ReaderError(
                "reader state was saved with another curriculum ("
                + "; ".join(changes[:8])
                + (f"; {len(changes) - 8} more" if len(changes) > 8 else "")
                + "): resuming would not continue its sample order; restore the config, or set "
                "data.replan_on_resume: true to rebuild the epoch plans from this config"
            )
        self.step, self.stage, self.step_in_stage = state["step"], state["stage"], state["step_in_stage"]
        self.pins = dict(state["pins"])
        with self._visibility_changed:  # re-pins after the resume use versions agreed now
            self._visibility = {self.step - 1: self.agreement.broadcast(self.newest_versions())}
        if changes:
            log.warning(
                "data: resuming with a changed curriculum (%s); epoch plans are rebuilt from the config",
                "; ".join(changes),
            )
            self.streams = {}
        else:
            self.streams = {k: StreamState.from_dict(v) for k, v in state["streams"].items()}
        self._plans.clear()


def curriculum(config: ReaderConfig) -> dict:
    """What fixes the sample order besides the seed and the snapshots (JSON-able, for `state_dict`)."""
    return {
        "stages": [
            {
                "name": s.name,
                "buckets": list(s.buckets),
                "micro_batch": s.micro_batch,
                "global_batch": s.global_batch,
                "steps": s.steps,
                "tasks": config.task_weights(i),
            }
            for i, s in enumerate(config.stages)
        ],
        "caches": [{"name": c.name, "weight": c.weight, "mode": c.mode, "tasks": list(c.tasks)} for c in config.caches],
    }


def curriculum_changes(saved: dict | None, current: dict) -> list[str]:
    """``data.<key>: saved X, now Y`` for each difference (none for a state saved before this check)."""
    if saved is None:
        return []
    changes = []
    for section in ("stages", "caches"):
        old, new = saved.get(section, []), current[section]
        if len(old) != len(new):
            changes.append(f"data.{section}: saved {len(old)} entries, now {len(new)}")
        for i, (a, b) in enumerate(zip(old, new)):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    changes.append(f"data.{section}[{i}].{key}: saved {a.get(key)!r}, now {b.get(key)!r}")
    return changes


def _choose(rng: np.random.Generator, weights: list[float]) -> int:
    """Index drawn with probability proportional to `weights` (one uniform draw)."""
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(weights) - 1))
