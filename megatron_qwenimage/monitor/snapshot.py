"""A run's telemetry files -> one typed `MonitorSnapshot`.

What is read (the telemetry contract; docs/monitoring.md):

* cache (``--cache``): the commit records ``commits/*.json`` (authoritative committed, duplicate and
  quarantined counts, samples per bucket), the snapshot versions, ``status.json`` (the newest
  producer run's latest status) and ``telemetry/producer-<run_id>.jsonl`` (its status history);
* run (``--run``): ``metrics.jsonl`` (one record per log interval, validation records carry
  ``val_loss``) and ``run.json`` (written by ``qwenimage run``; may be absent).

Files written by older producers/consumers lack the newer fields: those values are None (shown
as ``n/a``), never an error. A ``status.json`` field of the wrong type or range (`STATUS_FIELDS`)
is None too, and one warning names the file, the field and what was expected. Rates prefer the
newest record's own field; when it is absent they are derived from the two newest history
records. A `Monitor` reads incrementally (new commit records, appended JSONL lines) so that a
refresh every few seconds stays cheap on a long run, and a file that appears, vanishes or is being
appended to between a listing and a read is simply read again at the next refresh.

Units: *committed samples* are samples in committed shards (a sample stored at several bucket
areas counts once per shard), the unit the consumer's ``consumed_samples`` counts; the backlog is
committed samples minus consumed samples and the lead time is backlog / consumer samples/s.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_qwenimage.errors import UserError

#: ``<cache>/status.json`` (`producers.metrics.STATUS_FILE`; not imported: the cache side must not
#: depend on the producer package).
STATUS_FILE = "status.json"
#: ``<cache>/telemetry/producer-<run_id>.jsonl``: one status object per line.
TELEMETRY_DIR = "telemetry"
#: ``<run>/metrics.jsonl`` and ``<run>/run.json``.
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
#: A side whose newest record is older than this while it says it runs is flagged stale.
STALE_AFTER_S = 120.0
#: Status records kept for rate derivation.
_HISTORY = 8

_EXPECT_RUN = "a training run directory (the train config's logging.dir, holding metrics.jsonl)"
EXPECT_METRICS = "one JSON object per line, as qwenimage train writes to metrics.jsonl"
EXPECT_TELEMETRY = "one producer status object per line, as qwenimage produce writes"


class MonitorError(UserError):
    """A monitor input (cache, run directory, one of their files) is missing or malformed."""


def telemetry_path(run_id: str) -> str:
    """Cache-relative path of the producer telemetry of `run_id`."""
    return f"{TELEMETRY_DIR}/producer-{run_id}.jsonl"


# --- tolerant field access (files from older or newer writers) ----------------------------------
def number(value: object) -> float | None:
    """`value` as a finite float, or None (absent, not a number, NaN/inf, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def count(value: object) -> int | None:
    """`value` as an int (an integral float too), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def number_map(value: object) -> dict[str, float] | None:
    """A ``{name: number}`` object (entries that are not numbers dropped), or None."""
    if not isinstance(value, dict):
        return None
    out = {str(k): number(v) for k, v in value.items()}
    return {k: v for k, v in sorted(out.items()) if v is not None}


def count_map(value: object) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    out = {str(k): count(v) for k, v in value.items()}
    return {k: v for k, v in sorted(out.items()) if v is not None}


def pool_bounds(value: object) -> dict[str, str] | None:
    """``{"vae": [3, 3], "text": [1, 4]}`` -> ``{"text": "1:4", "vae": "3"}``; None if malformed."""
    if not isinstance(value, dict):
        return None
    out = {}
    for pool, bounds in sorted(value.items()):
        lo, hi = (count(b) for b in bounds) if isinstance(bounds, list) and len(bounds) == 2 else (None, None)
        if lo is not None and hi is not None:
            out[str(pool)] = str(lo) if lo == hi else f"{lo}:{hi}"
    return out or None


def text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def status_samples(record: dict) -> int | None:
    """Committed samples of a producer status: the sum of its per-bucket samples (the consumer's
    unit), else its committed inputs (older files without buckets)."""
    buckets = count_map(record.get("buckets"))
    if buckets:
        return sum(buckets.values())
    return count(record.get("committed"))


def rate_between(a: tuple[float, float] | None, b: tuple[float, float] | None) -> float | None:
    """(value_b - value_a) / (t_b - t_a) for two ``(t, value)`` points, None unless t_b > t_a."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


# --- the status.json contract (types and ranges) ---------------------------------------------------
def _is_whole(value: object, low: int = 0, high: int | None = None) -> bool:
    n = count(value)
    return n is not None and n >= low and (high is None or n <= high)


def _is_real(value: object, low: float = 0.0, high: float | None = None) -> bool:
    v = number(value)
    return v is not None and v >= low and (high is None or v <= high)


def _is_map_of(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, dict) and all(check(v) for v in value.values())


def _is_bounds(value: object) -> bool:
    return (
        isinstance(value, list) and len(value) == 2 and _is_whole(value[0], 1) and _is_whole(value[1], count(value[0]))
    )


@dataclass(frozen=True)
class FieldRule:
    """What one ``status.json`` field must be: `accepts(value)`, and `expected` in words."""

    accepts: Callable[[object], bool]
    expected: str


_WHOLE = FieldRule(_is_whole, "a whole number >= 0")
_TIME = FieldRule(_is_real, "seconds since the epoch, a finite number >= 0")
_RATE = FieldRule(_is_real, "a finite rate >= 0")
_TEXT = FieldRule(lambda v: isinstance(v, str), "a string")
_WHOLE_MAP = FieldRule(_is_map_of(_is_whole), "an object of whole numbers >= 0")
_RATE_MAP = FieldRule(_is_map_of(_is_real), "an object of finite rates >= 0")
_FRACTION_MAP = FieldRule(_is_map_of(lambda v: _is_real(v, 0.0, 1.0)), "an object of fractions in [0, 1]")

#: Every field of a producer status (`producers.metrics.StatusFile`) the monitor reads, with its
#: type and range. A field that is absent or null is simply unknown (older writers; shown n/a); one
#: that breaks its rule is a problem: reported (file, field, what was expected) and shown n/a.
STATUS_FIELDS: dict[str, FieldRule] = {
    "run_id": _TEXT,
    "run_label": _TEXT,
    "state": _TEXT,
    "started_unix": _TIME,
    "updated_unix": _TIME,
    "inputs": _WHOLE,
    "read": _WHOLE,
    "encoded": _WHOLE,
    "committed": _WHOLE,
    "duplicates": _WHOLE,
    "text_tokens": _WHOLE,
    "bytes_written": _WHOLE,
    "snapshot_version": _WHOLE,
    "pool_control_version": _WHOLE,
    "metrics_port": FieldRule(lambda v: _is_whole(v, 1, 65535), "a TCP port, a whole number in [1, 65535]"),
    "images_per_s": _RATE,
    "text_tokens_per_s": _RATE,
    "committed_per_s": _RATE,
    "quarantined": _WHOLE_MAP,
    "buckets": _WHOLE_MAP,
    "partitions": _WHOLE_MAP,
    "queues": _WHOLE_MAP,
    "actors": _WHOLE_MAP,
    "bucket_images_per_s": _RATE_MAP,
    "stage_busy": _FRACTION_MAP,
    "encoder_utilization": _FRACTION_MAP,
    "pool_bounds": FieldRule(
        _is_map_of(_is_bounds), "an object of [MIN, MAX] actor bounds, whole numbers with 1 <= MIN <= MAX"
    ),
}


def check_status(record: dict) -> tuple[dict, dict[str, str]]:
    """`record` without the fields that break `STATUS_FIELDS`, and field -> why (its value and what
    was expected). Null and unknown fields pass through (nulls read as absent)."""
    clean, problems = {}, {}
    for name, value in record.items():
        rule = STATUS_FIELDS.get(name)
        if value is None or rule is None or rule.accepts(value):
            clean[name] = value
        else:
            problems[name] = f"{json.dumps(value)[:80]}, expected {rule.expected}"
    return clean, problems


# --- files ----------------------------------------------------------------------------------------
def open_storage(url: str, flag: str):
    """A `CacheStorage` rooted at `url` (any directory, local or fsspec); `MonitorError` naming
    `flag` when the URL's filesystem cannot be used."""
    from megatron_qwenimage.cache.storage import CacheStorage

    try:
        return CacheStorage(url)
    except (ValueError, ImportError, OSError) as exc:
        raise MonitorError(f"{flag} {url}: cannot open this path or URL ({exc})") from None


def read_json_object(storage, relpath: str, expected: str) -> dict | None:
    """The JSON object at `relpath`, None when the file does not exist; `MonitorError` naming the
    file and `expected` when it is not a JSON object."""
    full = storage.path(relpath)
    try:
        data = storage.fs.cat_file(full)
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise MonitorError(f"{full}: cannot read it ({exc.strerror or exc}); expected {expected}") from None
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise MonitorError(f"{full}: not valid JSON ({exc}); expected {expected}") from None
    if not isinstance(obj, dict):
        raise MonitorError(f"{full}: a JSON {type(obj).__name__}; expected {expected}")
    return obj


class JsonlFollower:
    """The records appended to one JSONL file since the previous `read_new`.

    Works for files appended to (local disk) and for files rewritten whole with more lines
    (object stores): only the bytes after the last complete line are read. A file that shrank was
    replaced: it is read again from the start (`reset` says so). A last line still being written
    (no newline yet, not a whole JSON object) is left for the next call. Lines that are not JSON
    objects (a crash cut a line short, then the run resumed and appended) are skipped and counted;
    `check` raises when a file has only such lines.
    """

    def __init__(self, storage, relpath: str, expected: str) -> None:
        self.storage = storage
        self.relpath = relpath
        self.expected = expected
        self.offset = 0
        self.lines = 0
        self.records = 0
        self.bad_lines = 0
        self.first_bad: str | None = None
        self.exists = False
        self.reset = False

    @property
    def path(self) -> str:
        return self.storage.path(self.relpath)

    def read_new(self) -> list[dict]:
        """New whole records (possibly none); a file that does not exist (yet) gives none."""
        fs, full = self.storage.fs, self.path
        self.reset = False
        try:
            size = fs.size(full)
            if size is None:
                size = len(fs.cat_file(full))
            if size < self.offset:  # replaced by a shorter file: start over
                self.offset = self.lines = self.records = self.bad_lines = 0
                self.first_bad = None
                self.reset = True
            if size == self.offset:
                self.exists = True
                return []
            data = fs.cat_file(full, start=self.offset, end=size)
        except FileNotFoundError:
            self.exists = False
            return []
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            raise MonitorError(f"{full}: cannot read it ({exc.strerror or exc}); expected {self.expected}") from None
        self.exists = True
        out: list[dict] = []
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            self._parse(data[pos:nl], out)
            pos = nl + 1
        rest = data[pos:]
        if rest.strip():
            try:  # an unterminated last line counts once it is a whole object
                obj = json.loads(rest)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self.lines += 1
                self.records += 1
                out.append(obj)
                pos = len(data)
        self.offset += pos
        return out

    def _parse(self, line: bytes, out: list[dict]) -> None:
        self.lines += 1
        if not line.strip():
            return
        try:
            obj = json.loads(line)
        except ValueError as exc:
            obj, why = None, f"not valid JSON: {exc}"
        else:
            why = f"a JSON {type(obj).__name__}, not an object"
        if isinstance(obj, dict):
            self.records += 1
            out.append(obj)
            return
        self.bad_lines += 1
        if self.first_bad is None:
            self.first_bad = f"line {self.lines} is {why}"

    def check(self) -> None:
        """`MonitorError` when the file holds lines but not one readable record."""
        if self.records == 0 and self.bad_lines:
            raise MonitorError(f"{self.path}: {self.first_bad}; expected {self.expected}")

    def read_all(self) -> list[dict]:
        """Every record of the file (for the report); `MonitorError` if none of its lines is one."""
        records = self.read_new()
        self.check()
        return records


# --- the snapshot ---------------------------------------------------------------------------------
@dataclass
class CommitsView:
    """What the cache's commit records say (authoritative: what a consumer can read)."""

    partitions: int = 0
    committed_samples: int = 0  # samples in committed shards (the consumer's unit)
    committed_inputs: int = 0  # inputs committed (a sample at several areas counts once)
    inputs: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)  # bucket -> committed samples
    snapshot_version: int | None = None  # newest manifest snapshot
    unreadable_records: list[str] = field(default_factory=list)  # partition ids
    first_commit_unix: float | None = None
    last_commit_unix: float | None = None


@dataclass
class ProducerView:
    """The newest producer run, from ``status.json`` (+ its telemetry history for derived rates)."""

    present: bool = False  # a cache was given
    started: bool = False  # status.json exists
    run_id: str | None = None
    run_label: str | None = None
    state: str | None = None  # running | finished | failed (as the producer wrote it)
    stale: bool = False  # says running, but no update for STALE_AFTER_S
    started_unix: float | None = None
    updated_unix: float | None = None
    age_s: float | None = None
    images_per_s: float | None = None
    images_per_s_source: str | None = None  # "status" | "history" | None
    text_tokens_per_s: float | None = None
    bucket_images_per_s: dict[str, float] | None = None
    stage_busy: dict[str, float] | None = None
    encoder_utilization: dict[str, float] | None = None
    actors: dict[str, int] | None = None
    pool_bounds: dict[str, str] | None = None  # this window's actors per pool: "3" (a controller's) or "1:4"
    pool_control_version: int | None = None  # control/pools.json version in effect (0: configured bounds)
    queues: dict[str, int] | None = None
    inputs: int | None = None
    read: int | None = None
    encoded: int | None = None
    committed: int | None = None  # inputs committed, as the status counts them (this run's inputs)
    committed_samples: int | None = None  # sum of the status's per-bucket samples
    duplicates: int | None = None
    quarantined: dict[str, int] | None = None
    text_tokens: int | None = None
    partitions: dict[str, int] | None = None
    bytes_written: int | None = None
    committed_per_s_avg: float | None = None  # whole-run average (the older field)
    snapshot_version: int | None = None
    remaining_inputs: int | None = None
    eta_s: float | None = None
    metrics_port: int | None = None
    telemetry_file: str | None = None
    telemetry_records: int = 0


@dataclass
class ConsumerView:
    """The training run, from ``metrics.jsonl``."""

    present: bool = False  # a run directory was given
    started: bool = False  # metrics.jsonl has a record
    run_label: str | None = None
    state: str | None = None  # waiting | running | finished (| the run.json state when it stopped early)
    stale: bool = False
    step: int | None = None
    train_steps: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    val_step: int | None = None
    lr: float | None = None
    grad_norm: float | None = None
    samples_per_s: float | None = None
    samples_per_s_source: str | None = None  # "record" | "history" | None
    image_tokens_per_s: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    data_wait_fraction: float | None = None
    step_time_s: float | None = None
    memory_bytes: int | None = None
    skipped_steps: int | None = None
    consumed_samples: int | None = None
    consumed_source: str | None = None  # "consumed_samples" | "step*global_batch" | None
    global_batch: int | None = None
    reported_backlog_samples: int | None = None  # the consumer's own (tail caches)
    reported_lead_time_s: float | None = None
    updated_unix: float | None = None
    age_s: float | None = None
    eta_s: float | None = None
    records: int = 0
    bad_lines: int = 0
    metrics_file: str | None = None


@dataclass
class MonitorSnapshot:
    """Everything ``qwenimage monitor`` shows at one moment; `to_dict` is its ``--json`` form."""

    time_unix: float
    cache: str | None
    run: str | None
    run_label: str | None
    run_state: str | None  # run.json's state (None without run.json)
    producer: ProducerView
    consumer: ConsumerView
    commits: CommitsView | None  # None without a cache
    committed_samples: int | None
    consumed_samples: int | None
    backlog_samples: int | None
    lead_time_s: float | None
    quarantined: dict[str, int] | None
    warnings: list[str] = field(default_factory=list)

    @property
    def eta_s(self) -> dict[str, float | None]:
        return {"producer": self.producer.eta_s, "consumer": self.consumer.eta_s}

    @property
    def state(self) -> dict[str, str | None]:
        return {"producer": self.producer.state, "consumer": self.consumer.state, "run": self.run_state}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (non-finite floats become null)."""
        d = asdict(self)
        d["eta_s"] = self.eta_s
        d["state"] = self.state
        return _finite(d)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --- readers ----------------------------------------------------------------------------------------
@dataclass
class _Partition:
    samples: int
    committed: int
    inputs: int
    duplicates: int
    quarantined: dict[str, int]
    buckets: dict[str, int]
    created_unix: float


class CommitsReader:
    """The cache's commit records, read once each (a record never changes once committed; one
    moved to quarantine by ``qwenimage cache repair`` disappears from the listing)."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.storage = cache.storage
        self.partitions: dict[str, _Partition] = {}
        self.unreadable: dict[str, str] = {}

    def poll(self) -> CommitsView:
        from megatron_qwenimage.cache.commit import CommitRecordError, commit_record_names, read_commit
        from megatron_qwenimage.cache.manifest import snapshot_file_versions
        from megatron_qwenimage.cache.storage import CachePathError

        names = commit_record_names(self.storage)
        present = set(names)
        for gone in set(self.partitions) - present:
            del self.partitions[gone]
        self.unreadable = {p: why for p, why in self.unreadable.items() if p in present}
        for pid in names:
            if pid in self.partitions:
                continue
            try:
                rec = read_commit(self.storage, pid, strict=True)  # strict: no warning logged per refresh
            except (CommitRecordError, CachePathError) as exc:
                self.unreadable[pid] = str(exc)
                continue
            if rec is None:  # vanished between the listing and the read
                continue
            self.unreadable.pop(pid, None)
            buckets: dict[str, int] = {}
            for shard in rec.shards:
                buckets[shard.bucket.name] = buckets.get(shard.bucket.name, 0) + shard.num_samples
            self.partitions[pid] = _Partition(
                samples=sum(buckets.values()),
                committed=rec.committed,
                inputs=rec.inputs,
                duplicates=rec.duplicates,
                quarantined={str(k): int(v) for k, v in rec.quarantined.items()},
                buckets=buckets,
                created_unix=float(rec.created_unix),
            )
        view = CommitsView(partitions=len(self.partitions), unreadable_records=sorted(self.unreadable))
        quarantined: dict[str, int] = {}
        buckets: dict[str, int] = {}
        for p in self.partitions.values():
            view.committed_samples += p.samples
            view.committed_inputs += p.committed
            view.inputs += p.inputs
            view.duplicates += p.duplicates
            for reason, n in p.quarantined.items():
                quarantined[reason] = quarantined.get(reason, 0) + n
            for b, n in p.buckets.items():
                buckets[b] = buckets.get(b, 0) + n
        view.quarantined = dict(sorted(quarantined.items()))
        view.buckets = dict(sorted(buckets.items()))
        times = [p.created_unix for p in self.partitions.values()]
        view.first_commit_unix = min(times) if times else None
        view.last_commit_unix = max(times) if times else None
        versions = snapshot_file_versions(self.storage)
        view.snapshot_version = versions[-1] if versions else None
        return view

    def timeline(self) -> list[tuple[float, int]]:
        """``(created_unix, committed samples so far)`` after each commit, in time order."""
        total, out = 0, []
        for p in sorted(self.partitions.values(), key=lambda p: p.created_unix):
            total += p.samples
            out.append((p.created_unix, total))
        return out


class ProducerReader:
    """``status.json`` and the telemetry history of the run it names."""

    def __init__(self, storage) -> None:
        self.storage = storage
        self.status: dict | None = None
        self.follower: JsonlFollower | None = None
        self.run_id: str | None = None
        self.history: dict[float, dict] = {}  # updated_unix -> status record (the newest few)
        self.problems: dict[str, str] = {}  # status.json's fields that break STATUS_FIELDS -> why
        self.warnings: list[str] = []

    def poll(self) -> None:
        self.warnings = []
        path = self.storage.path(STATUS_FILE)
        raw = read_json_object(self.storage, STATUS_FILE, "the producer status object that qwenimage produce writes")
        if raw is None and self.status is not None:
            self.warnings.append(f"{path} vanished; showing the previous one")
        elif raw is not None:
            self.status, self.problems = check_status(raw)
        status = self.status
        if status is None:
            return
        self.warnings += [f"{path}: field {name!r} is {why}; shown as n/a" for name, why in self.problems.items()]
        run_id = text(status.get("run_id"))
        if run_id != self.run_id:  # a new producer run: its own telemetry
            self.run_id = run_id
            self.history = {}
            self.follower = JsonlFollower(self.storage, telemetry_path(run_id), EXPECT_TELEMETRY) if run_id else None
        if self.follower is not None:
            records = self.follower.read_new()
            if self.follower.reset:
                self.history = {}
            self._remember(records)
            if self.follower.bad_lines:
                self.warnings.append(
                    f"{self.follower.path}: {self.follower.bad_lines} line(s) are not JSON records "
                    f"({self.follower.first_bad}); skipped"
                )
        self._remember([status])

    def _remember(self, records: Iterable[dict]) -> None:
        """Keep the newest few records of this run (fields that break `STATUS_FIELDS` left out, so
        they never feed a derived rate)."""
        for rec in records:
            rec = check_status(rec)[0]
            t = number(rec.get("updated_unix"))
            if t is not None and (self.run_id is None or rec.get("run_id") in (None, self.run_id)):
                self.history[t] = rec
        if len(self.history) > _HISTORY:
            for t in sorted(self.history)[: len(self.history) - _HISTORY]:
                del self.history[t]

    def view(self, now: float) -> ProducerView:
        v = ProducerView(present=True)
        s = self.status
        if s is None:
            v.state = "waiting"
            return v
        v.started = True
        v.run_id = text(s.get("run_id"))
        v.run_label = text(s.get("run_label"))
        v.state = text(s.get("state"))
        v.started_unix = number(s.get("started_unix"))
        v.updated_unix = number(s.get("updated_unix"))
        v.age_s = None if v.updated_unix is None else max(0.0, now - v.updated_unix)
        v.stale = v.state == "running" and v.age_s is not None and v.age_s > STALE_AFTER_S
        for name in ("inputs", "read", "encoded", "committed", "duplicates", "text_tokens", "bytes_written"):
            setattr(v, name, count(s.get(name)))
        v.metrics_port = count(s.get("metrics_port"))
        v.snapshot_version = count(s.get("snapshot_version"))
        v.committed_samples = status_samples(s) if count_map(s.get("buckets")) else None
        v.quarantined = count_map(s.get("quarantined"))
        v.partitions = count_map(s.get("partitions"))
        v.queues = count_map(s.get("queues"))
        v.actors = count_map(s.get("actors"))
        v.pool_bounds = pool_bounds(s.get("pool_bounds"))
        v.pool_control_version = count(s.get("pool_control_version"))
        v.stage_busy = number_map(s.get("stage_busy"))
        v.encoder_utilization = number_map(s.get("encoder_utilization"))
        v.committed_per_s_avg = number(s.get("committed_per_s"))
        # rates: the status's own fields, else the two newest history records
        times = sorted(self.history)
        prev, last = (self.history[times[-2]], self.history[times[-1]]) if len(times) >= 2 else (None, None)

        def derived(get) -> float | None:
            if prev is None:
                return None
            a, b = get(prev), get(last)
            if a is None or b is None:
                return None
            return rate_between((times[-2], a), (times[-1], b))

        v.images_per_s = number(s.get("images_per_s"))
        v.images_per_s_source = "status" if v.images_per_s is not None else None
        if v.images_per_s is None:
            v.images_per_s = derived(status_samples)
            v.images_per_s_source = "history" if v.images_per_s is not None else None
        v.text_tokens_per_s = number(s.get("text_tokens_per_s"))
        if v.text_tokens_per_s is None:
            v.text_tokens_per_s = derived(lambda r: count(r.get("text_tokens")))
        v.bucket_images_per_s = number_map(s.get("bucket_images_per_s"))
        if v.bucket_images_per_s is None and prev is not None and count_map(last.get("buckets")):
            v.bucket_images_per_s = {}
            for b in count_map(last.get("buckets")):
                rate = derived(lambda rec, b=b: (count_map(rec.get("buckets")) or {}).get(b, 0))
                if rate is not None:
                    v.bucket_images_per_s[b] = rate
        if self.follower is not None:
            v.telemetry_file = self.follower.path if self.follower.exists else None
            v.telemetry_records = self.follower.records
        # ETA: inputs not yet accounted for x samples per committed input / samples per second
        # (images_per_s counts samples: an input makes one per bucket area). Approximate:
        # quarantined and duplicate inputs are counted as they come.
        if v.inputs is not None and v.committed is not None:
            done = v.committed + (v.duplicates or 0) + sum((v.quarantined or {}).values())
            v.remaining_inputs = max(0, v.inputs - done)
        if v.state == "finished" or v.remaining_inputs == 0:
            v.eta_s = 0.0
        elif v.remaining_inputs is not None and v.images_per_s and v.images_per_s > 0:
            per_input = v.committed_samples / v.committed if v.committed and v.committed_samples else 1.0
            v.eta_s = v.remaining_inputs * per_input / v.images_per_s
        return v


def _is_validation(record: dict) -> bool:
    return "val_loss" in record


class ConsumerReader:
    """``metrics.jsonl``: the newest training and validation records and what they imply."""

    def __init__(self, storage) -> None:
        self.storage = storage
        self.follower = JsonlFollower(storage, METRICS_FILE, EXPECT_METRICS)
        self.last_train: dict | None = None
        self.prev_train: dict | None = None
        self.last_val: dict | None = None
        self.last_time: float | None = None
        self.max_step: int | None = None
        self.train_steps: int | None = None
        self.global_batch: int | None = None
        self.run_label: str | None = None
        self.consumed: int | None = None  # newest consumed_samples field
        self.consumed_by_step: int | None = None  # newest step * global_batch
        self.checked = False

    def poll(self) -> None:
        records = self.follower.read_new()
        if self.follower.reset:  # the file was replaced and is read from its start: forget the old one
            follower = self.follower
            self.__init__(self.storage)
            self.follower = follower
        if not self.checked:
            self.follower.check()
            self.checked = self.follower.records > 0
        for rec in records:
            self._add(rec)

    def _add(self, rec: dict) -> None:
        step = count(rec.get("step"))
        if step is not None:
            self.max_step = step if self.max_step is None else max(self.max_step, step)
        t = number(rec.get("time"))
        if t is not None:
            self.last_time = t if self.last_time is None else max(self.last_time, t)
        if (n := count(rec.get("train_steps"))) is not None:
            self.train_steps = n
        if (n := count(rec.get("global_batch"))) is not None and n > 0:
            self.global_batch = n
        if (label := text(rec.get("run_label"))) is not None:
            self.run_label = label
        if (n := count(rec.get("consumed_samples"))) is not None:
            self.consumed = n
        elif step is not None and self.global_batch is not None:
            self.consumed_by_step = step * self.global_batch
        if _is_validation(rec):
            self.last_val = rec
        else:
            self.prev_train, self.last_train = self.last_train, rec

    def _consumed_of(self, rec: dict | None) -> int | None:
        if rec is None:
            return None
        n = count(rec.get("consumed_samples"))
        if n is not None:
            return n
        step, gb = count(rec.get("step")), count(rec.get("global_batch")) or self.global_batch
        return step * gb if step is not None and gb else None

    def view(self, now: float, run_state: str | None) -> ConsumerView:
        v = ConsumerView(present=True, metrics_file=self.follower.path)
        v.records = self.follower.records
        v.bad_lines = self.follower.bad_lines
        v.run_label = self.run_label
        v.train_steps = self.train_steps
        v.global_batch = self.global_batch
        if self.consumed is not None:
            v.consumed_samples, v.consumed_source = self.consumed, "consumed_samples"
        elif self.consumed_by_step is not None:
            v.consumed_samples, v.consumed_source = self.consumed_by_step, "step*global_batch"
        if v.records == 0:
            v.state = "waiting"
            return v
        v.started = True
        v.step = self.max_step
        v.updated_unix = self.last_time
        v.age_s = None if v.updated_unix is None else max(0.0, now - v.updated_unix)
        if self.last_val is not None:
            v.val_loss = number(self.last_val.get("val_loss"))
            v.val_step = count(self.last_val.get("step"))
        last, prev = self.last_train, self.prev_train
        if last is not None:
            v.loss = number(last.get("loss"))
            v.lr = number(last.get("lr"))
            v.grad_norm = number(last.get("grad_norm"))
            v.image_tokens_per_s = number(last.get("image_tokens_per_s"))
            v.tflops_per_gpu = number(last.get("tflops_per_gpu"))
            v.mfu = number(last.get("mfu"))
            v.data_wait_fraction = number(last.get("data_wait_fraction"))
            v.memory_bytes = count(last.get("memory_bytes"))
            v.skipped_steps = count(last.get("skipped_steps"))
            v.reported_backlog_samples = count(last.get("backlog_samples"))
            v.reported_lead_time_s = number(last.get("lead_time_s"))
            v.samples_per_s = number(last.get("samples_per_s"))
            v.samples_per_s_source = "record" if v.samples_per_s is not None else None
            v.step_time_s = number(last.get("step_time_s"))
            t_prev = number(prev.get("time")) if prev is not None else None
            t_last = number(last.get("time"))
            if v.samples_per_s is None and t_prev is not None and t_last is not None:
                a, b = self._consumed_of(prev), self._consumed_of(last)
                if a is not None and b is not None:
                    v.samples_per_s = rate_between((t_prev, a), (t_last, b))
                    v.samples_per_s_source = "history" if v.samples_per_s is not None else None
            if v.step_time_s is None and t_prev is not None and t_last is not None:
                s_prev, s_last = count(prev.get("step")), count(last.get("step"))
                if s_prev is not None and s_last is not None and s_last > s_prev and t_last > t_prev:
                    v.step_time_s = (t_last - t_prev) / (s_last - s_prev)
        finished = v.train_steps is not None and v.step is not None and v.step >= v.train_steps
        if finished:
            v.state, v.eta_s = "finished", 0.0
        else:
            v.state = run_state if run_state in ("finished", "failed", "stopped") else "running"
            if v.train_steps is not None and v.step is not None and v.step_time_s is not None:
                v.eta_s = (v.train_steps - v.step) * v.step_time_s
        v.stale = v.state == "running" and v.age_s is not None and v.age_s > STALE_AFTER_S
        return v


# --- the monitor ------------------------------------------------------------------------------------
def open_run(run: str):
    """The run directory's storage; `MonitorError` unless it is an existing directory."""
    storage = open_storage(run, "--run")
    fs, root = storage.fs, storage.root
    try:
        exists, isdir = fs.exists(root), fs.isdir(root)
    except OSError as exc:
        raise MonitorError(f"--run {run}: cannot list it ({exc}); expected {_EXPECT_RUN}") from None
    if not exists:
        raise MonitorError(f"--run {run}: does not exist; expected {_EXPECT_RUN}")
    if not isdir:
        raise MonitorError(f"--run {run}: is a file; expected {_EXPECT_RUN}")
    return storage


def open_monitored_cache(url: str, where: str):
    """`open_cache(url)`, its errors prefixed by `where` (``--cache`` or the run.json naming it)."""
    from megatron_qwenimage.cache.manifest import open_cache
    from megatron_qwenimage.cache.storage import CacheError

    try:
        return open_cache(url)
    except CacheError as exc:
        raise MonitorError(f"{where}: {exc}") from None
    except (ValueError, ImportError, OSError) as exc:
        raise MonitorError(
            f"{where} {url}: cannot open it ({exc}); expected the latent cache directory of qwenimage produce"
        ) from None


def read_run_info(run_storage) -> dict | None:
    return read_json_object(
        run_storage, RUN_FILE, 'the run.json that qwenimage run writes ({"run_label", "cache", "state", ...})'
    )


class Monitor:
    """Reads a cache and/or a run directory into `MonitorSnapshot`s, incrementally.

    Args:
        cache: the latent cache (path or fsspec URL); None: the one ``<run>/run.json`` names, if any.
        run: the training run directory (the train config's ``logging.dir``); None: producer only.

    Raises:
        MonitorError: naming the path and what was expected (the path does not exist, is not a
            cache, a run.json that is not JSON).
    """

    def __init__(self, cache: str | None = None, run: str | None = None) -> None:
        self.run = run
        self.run_storage = open_run(run) if run else None
        self.run_info = read_run_info(self.run_storage) if self.run_storage is not None else None
        self.cache_from_run = False
        if cache is None and self.run_info is not None and text(self.run_info.get("cache")):
            cache = self.run_info["cache"]
            self.cache_from_run = True
        self.cache_url = cache
        where = f"cache {cache} (named by {self.run_storage.path(RUN_FILE)})" if self.cache_from_run else "--cache"
        self.cache = open_monitored_cache(cache, where) if cache else None
        self.commits = CommitsReader(self.cache) if self.cache is not None else None
        self.producer = ProducerReader(self.cache.storage) if self.cache is not None else None
        self.consumer = ConsumerReader(self.run_storage) if self.run_storage is not None else None

    def poll(self, now: float | None = None) -> MonitorSnapshot:
        """Read what changed since the previous poll and return the current snapshot."""
        warnings: list[str] = []
        commits = None
        if self.cache is not None:
            _invalidate(self.cache.storage)
            commits = self.commits.poll()
            self.producer.poll()
            warnings += self.producer.warnings
            if commits.unreadable_records:
                warnings.append(
                    f"{len(commits.unreadable_records)} commit record(s) cannot be read and count as not "
                    f"committed ({', '.join(commits.unreadable_records[:3])}); `qwenimage cache verify` says why"
                )
        if self.run_storage is not None:
            _invalidate(self.run_storage)
            info = read_run_info(self.run_storage)
            self.run_info = info if info is not None else self.run_info
            self.consumer.poll()
            if self.consumer.follower.bad_lines:
                f = self.consumer.follower
                warnings.append(f"{f.path}: {f.bad_lines} line(s) are not JSON records ({f.first_bad}); skipped")
        now = time.time() if now is None else now
        run_state = text((self.run_info or {}).get("state"))
        producer = self.producer.view(now) if self.producer is not None else ProducerView()
        consumer = self.consumer.view(now, run_state) if self.consumer is not None else ConsumerView()
        committed = commits.committed_samples if commits is not None else None
        consumed = consumer.consumed_samples
        backlog = committed - consumed if committed is not None and consumed is not None else None
        rate = consumer.samples_per_s
        lead = backlog / rate if backlog is not None and rate is not None and rate > 0 else None
        label = text((self.run_info or {}).get("run_label")) or consumer.run_label or producer.run_label
        return MonitorSnapshot(
            time_unix=now,
            cache=self.cache_url,
            run=self.run,
            run_label=label,
            run_state=run_state,
            producer=producer,
            consumer=consumer,
            commits=commits,
            committed_samples=committed,
            consumed_samples=consumed,
            backlog_samples=backlog,
            lead_time_s=lead,
            quarantined=dict(commits.quarantined) if commits is not None else None,
            warnings=warnings,
        )


def _invalidate(storage) -> None:
    """Forget cached listings (object-store backends cache them) so a refresh sees new files."""
    try:
        storage.fs.invalidate_cache()
    except Exception:  # a backend without a listing cache
        pass
