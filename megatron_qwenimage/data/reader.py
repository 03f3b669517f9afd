"""Training-data reader: pinned cache snapshots -> per-rank micro-batches of one optimizer step.

    from megatron_qwenimage.data.reader import CacheReader, ReaderConfig

    reader = CacheReader(ReaderConfig.from_dict(run_config["data"]), dp_rank=rank, dp_size=world)
    reader.load_state_dict(checkpoint["data"])          # optional: exact resume
    for micro_batches in reader:                         # one optimizer step per item
        for mb in micro_batches:                         # global_batch / (micro_batch * dp_size) of them
            loss(model, mb.latents, mb.condition_latents, mb.text, mb.text_mask)
        checkpoint["data"] = reader.state_dict()         # what was consumed so far
    reader.close()

The global order of samples is decided by `mixing.Planner` independently of dp_size; each rank
reads only its slice. A background thread loads `prefetch_steps` steps ahead into a bounded queue;
`state_dict` describes what the caller has *consumed*, so a resume continues exactly there.

Tasks (Qwen-Image report, multi-task training):
  * t2i: target latents, no condition image, the sample's T2I-template text embedding.
  * edit: target latents, the edit source image's latents as the one condition image, the
    sample's edit-template text embedding (producers encode instruction + source image).
  * i2i: reconstruction. A t2i sample whose own target latents are also the condition image,
    with its T2I text embedding: the model learns to copy the condition frame, which aligns
    the condition-image pathway with the target latent space.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_qwenimage.cache.manifest import Shard, ShardChecksumError
from megatron_qwenimage.cache.shard_access import ShardedArray
from megatron_qwenimage.cache.shard_format import TENSORS_DIR, bf16_bits_to_float32, open_tensors_group
from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.data.agreement import RankAgreement, SingleProcess, plan_digest
from megatron_qwenimage.data.mixing import (
    CacheCatalog,
    EndOfData,
    Planner,
    ReaderError,
    ReaderInterrupted,
    ReaderStopped,
    SampleRef,
    StepPlan,
    TailTimeoutError,
    stable_tag,
)
from megatron_qwenimage.data.reader_config import (
    TASK_SAMPLE_KIND,
    CacheSource,
    ReaderConfig,
    StageConfig,
    ValidationConfig,
)

log = logging.getLogger(__name__)

__all__ = [
    "CacheReader",
    "CacheSource",
    "EndOfData",
    "MicroBatch",
    "ReaderConfig",
    "ReaderError",
    "ReaderInterrupted",
    "ShardChecksumError",
    "StageConfig",
    "StepPlan",
    "TailTimeoutError",
    "ValidationConfig",
    "ValidationReader",
]


@dataclass
class MicroBatch:
    """Samples of one bucket, ready for the model (all float32 on CPU).

    Attributes:
        latents: ``[B, C, h, w]`` target image latents (normalised VAE mode, cast from bf16).
        condition_latents: one ``[B, C, hc, wc]`` tensor per condition image; [] for t2i.
        text: ``[B, T, D_txt]`` text-encoder states, zero-padded to T (longest or `text_length`).
        text_mask: ``[B, T]`` bool, True for valid tokens.
        task: "t2i" | "edit" | "i2i".
        bucket: bucket name "<height>x<width>" in pixels.
        sample_ids: the samples' ids (content hashes), in batch order.
    """

    latents: torch.Tensor
    condition_latents: list[torch.Tensor]
    text: torch.Tensor
    text_mask: torch.Tensor
    task: str
    bucket: str
    sample_ids: list[str]

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])


@dataclass
class _Row:
    """One sample as stored: bfloat16 bit patterns in uint16 arrays."""

    latents: np.ndarray  # uint16 [C, h, w]
    text: np.ndarray  # uint16 [L, D]
    condition: np.ndarray | None  # uint16 [C, h, w]
    sample_id: str
    shard_id: str


class _ZarrRows:
    """Fallback row access through zarr-python (any layout zarr can read)."""

    def __init__(self, array) -> None:
        self.array = array

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])

    def close(self) -> None:
        pass


def _array(shard: Shard, group, name: str):
    """Row access to array `name` of the shard: direct (`ShardedArray`) when the layout allows."""
    fast = ShardedArray.open(shard.storage, f"{shard.path}/{TENSORS_DIR}/{name}")
    return fast if fast is not None else _ZarrRows(group[name])


class _OpenShard:
    """Row access to the arrays and sample-table columns of one open shard."""

    def __init__(self, shard: Shard) -> None:
        group = open_tensors_group(shard.storage, shard.path)
        names = set(group.array_keys())
        self.shard = shard
        self.offsets = np.asarray(group["text_offsets"][:], dtype=np.int64)
        self.latents = _array(shard, group, "latents")
        self.text = _array(shard, group, "text_embeddings") if self.offsets[-1] > 0 else None
        self.condition = _array(shard, group, "condition_latents") if "condition_latents" in names else None
        self.sample_ids = shard.samples.column("sample_id").to_pylist()
        self.kinds = shard.samples.column("task").to_pylist()

    def row(self, i: int) -> _Row:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        cond = None
        if self.kinds[i] == "edit":
            if self.condition is None:
                raise ReaderError(
                    f"shard {self.shard.shard_id}: edit sample {self.sample_ids[i]} has no condition_latents array"
                )
            cond = self.condition.rows(i, i + 1)[0]
        if hi == lo:
            raise ReaderError(f"shard {self.shard.shard_id}: sample {self.sample_ids[i]} has no text tokens")
        return _Row(
            self.latents.rows(i, i + 1)[0], self.text.rows(lo, hi), cond, self.sample_ids[i], self.shard.shard_id
        )

    def close(self) -> None:
        for a in (self.latents, self.text, self.condition):
            if a is not None:
                a.close()


class ShardPool:
    """Opens shards on demand (verifying checksums the first time, if asked); LRU of open shards."""

    def __init__(self, catalogs: dict[str, CacheCatalog], *, verify: bool, max_open: int) -> None:
        self.catalogs = catalogs
        self.verify = verify
        self.max_open = max_open
        self._open: OrderedDict[tuple[str, str], _OpenShard] = OrderedDict()
        self._verified: set[tuple[str, str]] = set()

    def _get(self, cache: str, shard_id: str) -> _OpenShard:
        key = (cache, shard_id)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        shard = self.catalogs[cache].shard(shard_id)
        if self.verify and key not in self._verified:
            shard.verify()  # ShardChecksumError naming the shard
            self._verified.add(key)
        opened = _OpenShard(shard)
        self._open[key] = opened
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return opened

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def read(self, cache: str, refs: tuple[SampleRef, ...]) -> list[_Row]:
        return [self._get(cache, r.shard_id).row(r.row) for r in refs]


def collate(rows: list[_Row], *, task: str, bucket: str, text_length: int | None = None) -> MicroBatch:
    """Stack rows of one bucket into a `MicroBatch` for `task` (see the module docstring)."""
    latents = bf16_bits_to_float32(np.stack([r.latents for r in rows]))
    if task == "t2i":
        conditions = []
    elif task == "i2i":
        conditions = [latents.clone()]
    elif task == "edit":
        missing = [r.sample_id for r in rows if r.condition is None]
        if missing:
            raise ReaderError(f"edit micro-batch: samples {missing} have no condition latents")
        conditions = [bf16_bits_to_float32(np.stack([r.condition for r in rows]))]
    else:
        raise ValueError(f"unknown task {task!r}")
    lengths = [r.text.shape[0] for r in rows]
    t = text_length if text_length is not None else max(lengths)
    too_long = [(r.sample_id, r.shard_id, n) for r, n in zip(rows, lengths) if n > t]
    if too_long:
        raise ReaderError(f"data.text_length={t}: samples (sample_id, shard, tokens) {too_long} are longer")
    text = np.zeros((len(rows), t, rows[0].text.shape[1]), dtype=np.uint16)  # bit pattern 0 is +0.0
    for i, (r, n) in enumerate(zip(rows, lengths)):
        text[i, :n] = r.text
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return MicroBatch(latents, conditions, bf16_bits_to_float32(text), mask, task, bucket, [r.sample_id for r in rows])


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _outcome_code(failure: Exception | None) -> int:
    """The code of a step's load outcome that the ranks gather (`CacheReader._agree_on_outcome`)."""
    if failure is None:
        return 0
    if isinstance(failure, EndOfData):
        return 1
    if isinstance(failure, ReaderInterrupted):
        return 3
    return 2


class CacheReader:
    """The micro-batches of this data-parallel rank, one optimizer step at a time.

    Args:
        config: `ReaderConfig` (caches, curriculum stages, task weights, prefetch...).
        dp_rank, dp_size: this rank and the data-parallel world size. Every stage's global batch
            must divide into ``micro_batch * dp_size`` (`ConfigError` naming the stage otherwise).
        agreement: collectives over the ranks that must agree on every step (`RankAgreement`).
        read_samples: False on the ranks of a data-parallel replica that receive its samples from
            one reading peer (Megatron's ``broadcast_data``; see ``consumers.data``). They still
            plan every step (pins, order, agreement hash, state) but open, verify and read no
            shard; `next_global_step` returns ``[]`` there.

    Raises from `next_global_step`: `EndOfData` when the curriculum is done (iteration stops),
    `ShardChecksumError` naming a corrupted shard, `TailTimeoutError` naming a cache that stopped
    growing, `ReaderError` for data that cannot feed the config, `ReaderInterrupted` when the
    `set_interrupt` callable asked to stop while a tail cache waited (on every rank alike).
    """

    def __init__(
        self,
        config: ReaderConfig,
        *,
        dp_rank: int,
        dp_size: int,
        agreement: RankAgreement | None = None,
        read_samples: bool = True,
    ) -> None:
        config.check_dp(dp_size)
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank!r}: expected 0 <= dp_rank < dp_size={dp_size}")
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.read_samples = read_samples
        self._agreement = agreement or SingleProcess()
        self._catalogs = {c.name: CacheCatalog(c) for c in config.caches}
        self._stop = threading.Event()
        self._planner = Planner(
            config, self._catalogs, stop=self._stop, agreement=self._agreement, visibility_lag=config.prefetch_steps + 1
        )
        self._pool = ShardPool(self._catalogs, verify=config.verify_checksums, max_open=config.max_open_shards)
        self._consumed = self._planner.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._terminal: BaseException | None = None
        #: The `StepPlan` of the step last returned (task, bucket, stage, cache, global refs).
        self.last_step: StepPlan | None = None

    # ------------------------------------------------------------------ loading
    def _load(self) -> tuple[list[MicroBatch], StepPlan, dict]:
        plan = self._planner.next_step()
        if not self.read_samples:
            return [], plan, self._planner.state_dict()
        batches = [
            collate(
                self._pool.read(plan.cache, refs),
                task=plan.task,
                bucket=plan.bucket,
                text_length=self.config.text_length,
            )
            for refs in plan.rank_micro_batches(self.dp_rank, self.dp_size)
        ]
        return batches, plan, self._planner.state_dict()

    def _prefetch_loop(self) -> None:
        q = self._queue
        try:
            while not self._stop.is_set():
                self._hand_over(q, self._load())
        except ReaderStopped:
            return
        except BaseException as exc:  # handed to the consumer, raised there
            self._hand_over(q, _Failed(exc))

    def _hand_over(self, q: queue.Queue, item) -> None:
        """Queue `item` for `next_global_step`; give up when the reader shuts down meanwhile (a full
        queue must not keep the thread, and `close`, waiting: a stop raises while steps are queued)."""
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.config.prefetch_steps)
        self._thread = threading.Thread(target=self._prefetch_loop, name=f"data-prefetch-dp{self.dp_rank}", daemon=True)
        self._thread.start()

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = None
        self._stop.clear()

    # ------------------------------------------------------------------ public API
    def set_interrupt(self, interrupt) -> None:
        """Poll `interrupt()` (no arguments; True: stop) while a tail cache waits for a snapshot.

        It is called from the prefetch thread too (every ``data.tail_poll_s`` of a wait), so it
        must be cheap and thread-safe. The wait then ends with `ReaderInterrupted` on this rank, and
        `next_global_step` raises it on every rank of the agreement.
        """
        self._planner.interrupt = interrupt

    def next_global_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next optimizer step (all of one bucket and task);
        ``[]`` when the reader was built with ``read_samples=False``.

        A collective over the agreement's ranks: a step that fails to load on any rank (a
        corrupted shard found by the one rank that reads it, a tail timeout) stops every rank
        with that rank's message, instead of leaving the others waiting in a collective.
        """
        if self._terminal is not None:
            raise self._terminal
        step = int(self._consumed["step"])
        try:
            item, failure = self._next_item(), None
        except Exception as exc:
            item, failure = None, exc
        self._agree_on_outcome(step, failure)
        batches, self.last_step, self._consumed = item
        self._agree_on(self.last_step)
        return batches

    def _next_item(self) -> tuple[list[MicroBatch], StepPlan, dict]:
        if self.config.prefetch_steps == 0:
            return self._load()
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failed):
            self._shutdown()
            raise item.exc
        return item

    def _agree_on_outcome(self, step: int, failure: Exception | None) -> None:
        """Every rank learns whether every rank loaded step `step` (one small gather per step).

        Outcome codes: 0 loaded, 1 end of data, 2 a failure, 3 interrupted by a stop request. A
        failure on any rank wins (every rank raises it); otherwise an interruption on any rank stops
        every rank with `ReaderInterrupted`, even those that loaded the step (its samples are dropped:
        `state_dict` still stands after the last step returned, which is what a checkpoint saves).
        """
        code = _outcome_code(failure)
        codes = self._agreement.gather_int(code)
        if not any(codes):
            return
        if set(codes) == {1}:  # the curriculum ended on every rank alike
            self._terminal = failure
            raise failure
        if 2 not in codes and 3 in codes:
            first = codes.index(3)
            self._terminal = (
                failure
                if code == 3
                else ReaderInterrupted(f"step {step}: rank {first} stopped waiting for data on a stop request")
            )
            self._shutdown()
            raise self._terminal
        messages = self._agreement.gather_object(
            None if failure is None else f"{type(failure).__name__}: {' '.join(str(failure).split())}"
        )
        if failure is not None and code == 2:
            self._terminal = failure
            if set(codes) == {2} and len(set(messages)) == 1:  # every rank failed alike (a tail timeout)
                failure.collective = True  # rank 0 reports it for all
        else:
            first = next(r for r, c in enumerate(codes) if c)
            self._terminal = ReaderError(
                f"step {step}: rank {first} could not load its data "
                f"({messages[first] if first < len(messages) else 'its message did not arrive'}); "
                f"ranks with a load failure: {[r for r, c in enumerate(codes) if c]}"
            )
            self._terminal.collective = True  # said alike by every rank that loaded; rank 0 reports
        self._shutdown()
        raise self._terminal

    def _agree_on(self, plan: StepPlan) -> None:
        """Collectives of the consumed step: the step's samples must be the same on every rank
        (a hash compared across the world), and the ``grow`` snapshot versions visible on every
        rank are recorded for later re-pins (see `Planner.visible_version`)."""
        digests = self._agreement.gather_int(plan_digest(plan))
        if len(set(digests)) > 1:
            groups: dict[int, list[int]] = {}
            for rank, d in enumerate(digests):
                groups.setdefault(d, []).append(rank)
            self._terminal = ReaderError(
                f"step {plan.step}: ranks disagree on the step's samples (rank groups {sorted(groups.values())}; "
                f"this rank: cache {plan.cache!r} snapshot v{plan.snapshot_version}, bucket {plan.bucket}, task "
                f"{plan.task}); their reader configs, states or snapshots differ: stopping before the step runs"
            )
            self._terminal.collective = True
            self._shutdown()
            raise self._terminal
        if self._planner.has_growing_caches:
            newest = self._planner.newest_versions()
            agreed = {name: min(self._agreement.gather_int(v)) for name, v in sorted(newest.items())}
            self._planner.record_visibility(plan.step, agreed)

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        while True:
            try:
                yield self.next_global_step()
            except EndOfData:
                return

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last step returned (not what was prefetched)."""
        import copy

        return copy.deepcopy(self._consumed)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a `state_dict` of a reader with the same config and seed)."""
        self._shutdown()
        self._planner.load_state_dict(state)
        self._consumed = self._planner.state_dict()
        self._terminal = None
        self.last_step = None

    def close(self) -> None:
        """Stop the prefetch thread (also interrupts a tail wait) and close open shards."""
        self._shutdown()
        self._pool.close()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ValidationReader:
    """Fixed held-out micro-batches: the same samples, in the same order, every time.

    The global list covers, for each bucket (sorted) and task of the config, `samples_per_bucket`
    samples chosen by `seed`, cut into micro-batches of `micro_batch` (the last may be smaller).
    Rank r takes micro-batches r, r + dp_size, ...; ranks may get one micro-batch more or less,
    so reduce sums (loss * elements, elements) over ranks, not per-rank means.

    Args:
        config: `ValidationConfig`.
        dp_rank, dp_size: this rank's share.
        verify_checksums, text_length: as in `ReaderConfig`.
    """

    def __init__(
        self,
        config: ValidationConfig,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        verify_checksums: bool = True,
        text_length: int | None = None,
        agreement: RankAgreement | None = None,
    ) -> None:
        if not isinstance(dp_rank, int) or not isinstance(dp_size, int) or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank!r}, dp_size={dp_size!r}: expected 0 <= dp_rank < dp_size")
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.text_length = text_length
        source = CacheSource(config.path, name="validation", pin=config.pin, where=config.where)
        self._catalog = CacheCatalog(source)
        versions = self._catalog.versions()
        newest = versions[-1] if versions else 0
        self.snapshot_version = (
            config.pin if config.pin is not None else (agreement or SingleProcess()).broadcast(newest)
        )
        snap = self._catalog.snapshot(self.snapshot_version)
        if snap is None:
            raise ReaderError(f"validation cache {config.path} has no snapshot")
        if config.pin is None:
            log.info("validation: cache %s pinned to its newest snapshot v%d", config.path, self.snapshot_version)
        present = snap.samples_per_bucket()
        buckets = config.buckets or tuple(present)
        for i, b in enumerate(buckets):
            if b not in present:
                raise ConfigError(
                    f"{config.where}.buckets[{i}]={b!r}: snapshot v{self.snapshot_version} of "
                    f"{config.path} has no such bucket (it has {sorted(present)})"
                )
        self._catalog.check_text_length(self.snapshot_version, set(buckets), text_length)
        self._pool = ShardPool({"validation": self._catalog}, verify=verify_checksums, max_open=64)
        self.micro_batches: list[tuple[str, str, tuple[SampleRef, ...]]] = []  # (task, bucket, refs), global
        for bucket in sorted(buckets):
            for task in config.tasks:
                cands = self._catalog.candidates(self.snapshot_version, None, TASK_SAMPLE_KIND[task], (bucket,), [])
                rng = np.random.default_rng([config.seed, stable_tag(bucket), stable_tag(task)])
                perm = rng.permutation(len(cands[bucket]))[: config.samples_per_bucket]
                refs = [cands[bucket][j] for j in perm]
                for i in range(0, len(refs), config.micro_batch):
                    self.micro_batches.append((task, bucket, tuple(refs[i : i + config.micro_batch])))
        if not self.micro_batches:
            raise ReaderError(
                f"validation cache {config.path} v{self.snapshot_version}: no samples for tasks "
                f"{list(config.tasks)} in buckets {sorted(buckets)}"
            )
        self._batches: list[MicroBatch] | None = None

    def batches(self) -> list[MicroBatch]:
        """This rank's fixed validation micro-batches (loaded once, then reused)."""
        if self._batches is None:
            mine = self.micro_batches[self.dp_rank :: self.dp_size]
            self._batches = [
                collate(self._pool.read("validation", refs), task=task, bucket=bucket, text_length=self.text_length)
                for task, bucket, refs in mine
            ]
        return self._batches
