"""Exactly-once publication of a partition's shards: private attempts, checksums, exclusive commit.

The unit of commitment is an *input partition*: a fixed, deterministic group of inputs. Every
attempt at a partition (a first run, a Ray retry, a second producer racing the first, a rerun
after a crash) writes under its own private directory::

    attempts/<partition_id>/<attempt_id>/attempt.json          who/when (for the orphan sweep)
    attempts/<partition_id>/<attempt_id>/<bucket>/...          one shard per bucket (shard_format)
    attempts/<partition_id>/<attempt_id>/quarantine.parquet    inputs rejected, with reasons
    attempts/<partition_id>/<attempt_id>/duplicates.parquet    inputs skipped as duplicates

then computes SHA-256 checksums of every file and publishes by *exclusively creating*
``commits/<partition_id>.json`` (`CacheStorage.write_exclusive`). The first attempt to create
it wins; a loser deletes its directory. Readers list commit records only, so an attempt that
died half-way is invisible, and `megatron_qwenimage.cache.sweep.sweep_orphans` removes what it left.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from megatron_qwenimage.cache.shard_format import SCHEMA_VERSION, Bucket
from megatron_qwenimage.cache.storage import CachePathError, CacheStorage, resolve_record_path
from megatron_qwenimage.errors import UserError

log = logging.getLogger(__name__)

COMMITS_DIR = "commits"
ATTEMPTS_DIR = "attempts"
ATTEMPT_INFO_FILE = "attempt.json"
#: Unreadable commit records are moved here (``quarantine/commits/<partition_id>/<stamp>.json``),
#: never deleted: by `qwenimage cache repair`, or by a producer that re-produces the partition.
QUARANTINE_DIR = "quarantine"
QUARANTINED_COMMITS_DIR = f"{QUARANTINE_DIR}/commits"
#: ``attempts/<partition>/<attempt>`` inside any JSON text (a record or snapshot that cannot be parsed).
_ATTEMPT_DIR_IN_TEXT = re.compile(rb'attempts/([^/"\\\s]+)/([^/"\\\s]+)')


class CommitError(UserError, RuntimeError):
    """A commit record or an attempt is malformed; the message names it."""


class CommitRecordError(CommitError):
    """A commit record file cannot be used: not JSON, not the record schema, or not its partition's.

    The partition counts as not committed (readers and producers skip the record with a warning
    and a producer re-produces the partition); ``qwenimage cache verify`` reports it and
    ``qwenimage cache repair`` moves it to ``quarantine/commits/``. `path` is the cache-relative
    path of the record.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


@dataclass
class FileChecksum:
    sha256: str
    bytes: int


@dataclass
class ShardEntry:
    """A committed shard as listed in its partition's commit record.

    Attributes:
        shard_id: ``<partition_id>-<bucket>``, unique in the cache.
        path: shard directory relative to the cache root.
        height_px, width_px: the bucket in pixels; latent_height/width = pixels / 8.
        latent_channels: C of the latents (VAE z_dim, 16 for Qwen-Image).
        text_dim: D of the text embeddings (3584 for Qwen2.5-VL-7B).
        num_samples: N.
        files: relative path inside the shard -> checksum, for every file of the shard.
    """

    shard_id: str
    path: str
    height_px: int
    width_px: int
    latent_height: int
    latent_width: int
    latent_channels: int
    text_dim: int
    num_samples: int
    files: dict[str, FileChecksum]

    @property
    def bucket(self) -> Bucket:
        return Bucket(self.height_px, self.width_px)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardEntry:
        _expect(d, dict, "a shard entry")
        d = dict(d)
        _expect(d.get("files"), dict, "files")
        files = {}
        for k, v in d["files"].items():
            _expect(v, dict, f"files[{k!r}]")
            files[k] = FileChecksum(**v)
            _expect(files[k].sha256, str, f"files[{k!r}].sha256")
            _expect(files[k].bytes, int, f"files[{k!r}].bytes")
        d["files"] = files
        entry = cls(**d)
        for name in ("shard_id", "path"):
            _expect(getattr(entry, name), str, name)
        for name in (
            "height_px",
            "width_px",
            "latent_height",
            "latent_width",
            "latent_channels",
            "text_dim",
            "num_samples",
        ):
            _expect(getattr(entry, name), int, name)
        return entry


def _expect(value, kind: type, what: str) -> None:
    """Schema check of one parsed JSON value (bool is not an int here)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{what} is {type(value).__name__} {value!r:.60}, expected {kind.__name__}")


@dataclass
class CommitRecord:
    """Content of ``commits/<partition_id>.json``: what one partition published.

    ``inputs == committed + duplicates + sum(quarantined.values())`` always holds.
    """

    partition_id: str
    attempt_id: str
    inputs: int
    committed: int
    duplicates: int
    quarantined: dict[str, int]
    shards: list[ShardEntry]
    tables: dict[str, dict]  # "quarantine"/"duplicates" -> {"path", "sha256", "bytes"}
    encoder_version: str = ""
    run_id: str = ""
    created_unix: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        total = self.committed + self.duplicates + sum(self.quarantined.values())
        if total != self.inputs:
            raise CommitError(
                f"commit record of partition {self.partition_id}: committed {self.committed} + "
                f"duplicates {self.duplicates} + quarantined {sum(self.quarantined.values())} = "
                f"{total}, but the partition has {self.inputs} inputs"
            )

    def to_json(self) -> bytes:
        d = asdict(self)
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "commit record", path: str = "") -> CommitRecord:
        """Parse and check a record: `CommitRecordError` (naming `where`) unless it is valid JSON of
        the record schema; `CachePathError` if a path in it leaves the cache. `path`: the record's
        cache-relative file, kept on the error."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CommitRecordError(f"{where}: not valid JSON ({exc}); expected a commit record object", path) from exc
        if not isinstance(d, dict):
            raise CommitRecordError(f"{where}: a JSON {type(d).__name__}, expected a commit record object", path)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise CommitRecordError(
                f"{where}: schema_version {d.get('schema_version')!r}, this reader knows {SCHEMA_VERSION}", path
            )
        try:
            _expect(d.get("shards"), list, "shards")
            d["shards"] = [ShardEntry.from_dict(s) for s in d["shards"]]
            record = cls(**d)
            for name in ("partition_id", "attempt_id", "encoder_version", "run_id"):
                _expect(getattr(record, name), str, name)
            for name in ("inputs", "committed", "duplicates"):
                _expect(getattr(record, name), int, name)
            _expect(record.quarantined, dict, "quarantined")
            _expect(record.tables, dict, "tables")
        except CommitError as exc:  # counts that do not add up
            raise CommitRecordError(f"{where}: {exc}", path) from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CommitRecordError(f"{where}: not a valid commit record ({exc})", path) from exc
        record.check_paths(where)  # CachePathError naming the record and the entry
        return record

    def check_paths(self, where: str) -> None:
        """Every path of the record is a relative path inside the cache (`resolve_record_path`).

        Raises:
            CachePathError: naming `where` (the record) and the offending entry.
        """
        for i, shard in enumerate(self.shards):
            resolve_record_path(None, shard.path, record=where, entry=f"shards[{i}].path")
            for rel in shard.files:
                resolve_record_path(None, rel, record=where, entry=f"shards[{i}].files[{rel!r}]")
        for name, table in sorted(self.tables.items()):
            if isinstance(table, dict) and "path" in table:
                resolve_record_path(None, table["path"], record=where, entry=f"tables.{name}.path")


def commit_path(partition_id: str) -> str:
    """Cache-relative path of `partition_id`'s commit record, ``commits/<partition_id>.json``: the one
    place that builds it (readers, writers, verify and repair all call this)."""
    return f"{COMMITS_DIR}/{partition_id}.json"


def parse_commit(storage: CacheStorage, partition_id: str, data: bytes) -> CommitRecord:
    """`data`, read from ``commits/<partition_id>.json``, as a record of that partition.

    Raises:
        CommitRecordError: not JSON, not the record schema, or the record of another partition.
        CachePathError: a path in it leaves the cache.
    """
    rel = commit_path(partition_id)
    where = f"commit record {storage.path(rel)}"
    record = CommitRecord.from_json(data, where=where, path=rel)
    if record.partition_id != partition_id:
        raise CommitRecordError(
            f"{where}: names partition {record.partition_id!r}, expected {partition_id!r} (the file name)", rel
        )
    return record


def read_commit(storage: CacheStorage, partition_id: str, *, strict: bool = False) -> CommitRecord | None:
    """The commit record of `partition_id`, or None if it is not committed.

    A record that cannot be used (`CommitRecordError`, `CachePathError`) raises with `strict`;
    otherwise it is logged once as a warning naming the file and the partition counts as not
    committed: a producer re-produces it (moving the bad record to quarantine when it commits),
    readers and snapshots leave it out, the sweep keeps every attempt of the partition.
    """
    rel = commit_path(partition_id)
    try:
        data = storage.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        return parse_commit(storage, partition_id, data)
    except (CommitRecordError, CachePathError) as exc:
        if strict:
            raise
        warn_unreadable_commit(storage, rel, exc)
        return None


_warned: set[str] = set()


def warn_unreadable_commit(storage: CacheStorage, rel: str, exc: Exception) -> None:
    """Log (once per record per process) that an unusable commit record is skipped."""
    full = storage.path(rel)
    if full in _warned:
        return
    _warned.add(full)
    log.warning(
        "skipping commit record %s: %s; its partition counts as not committed (it is re-produced, its "
        "attempt files are kept); `qwenimage cache repair %s` moves the record to %s/",
        full,
        " ".join(str(exc).replace(f"commit record {full}: ", "").split()),
        storage.url,
        QUARANTINED_COMMITS_DIR,
    )


def commit_record_names(storage: CacheStorage) -> list[str]:
    """Partition ids of every file in ``commits/`` that is a record (not an exclusive-create temp)."""
    return sorted(
        name[: -len(".json")]
        for name in storage.listdir(COMMITS_DIR)
        if name.endswith(".json") and ".tmp-" not in name and not name.startswith(".")
    )


def list_commits(storage: CacheStorage, *, strict: bool = False) -> list[CommitRecord]:
    """Every commit record of the cache, sorted by partition id; unusable ones are skipped with a
    warning (raise with `strict`), see `read_commit`."""
    records = []
    for partition_id in commit_record_names(storage):
        rec = read_commit(storage, partition_id, strict=strict)
        if rec is not None:
            records.append(rec)
    return records


def read_all_commits(storage: CacheStorage) -> tuple[list[CommitRecord], dict[str, Exception]]:
    """Every readable commit record (sorted by partition id) and, partition id -> error, every
    record that cannot be used; nothing is logged (the caller decides what an unreadable record
    means). A record that vanishes between the listing and its read is in neither."""
    records: list[CommitRecord] = []
    bad: dict[str, Exception] = {}
    for partition_id in commit_record_names(storage):
        try:
            record = read_commit(storage, partition_id, strict=True)
        except (CommitRecordError, CachePathError) as exc:
            bad[partition_id] = exc
            continue
        if record is not None:
            records.append(record)
    return records, bad


def unreadable_commits(storage: CacheStorage) -> dict[str, Exception]:
    """Partition id -> the error of every commit record that cannot be used."""
    return read_all_commits(storage)[1]


def quarantine_commit(
    storage: CacheStorage, partition_id: str, expected: bytes | None = None, reason: str = ""
) -> str | None:
    """Move ``commits/<partition_id>.json`` to ``quarantine/commits/<partition_id>/<stamp>.json``.

    Nothing is deleted: the record keeps its bytes under the new name, next to a ``.why.json``
    saying where it came from and why. With `expected`, only those bytes are moved: if the record
    changed in between (another process quarantined the bad one and committed a good record), the
    good one is put back by exclusive create. Returns the new cache-relative path, or None if there
    was nothing (or something else) to move.
    """
    src = commit_path(partition_id)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dst = f"{QUARANTINED_COMMITS_DIR}/{partition_id}/{stamp}-{uuid.uuid4().hex[:8]}.json"
    try:
        if expected is not None and storage.read_bytes(src) != expected:
            return None
        storage.move(src, dst)
    except FileNotFoundError:
        return None
    moved = storage.read_bytes(dst)
    if expected is not None and moved != expected:  # raced with a good commit: put it back
        if storage.write_exclusive(src, moved):
            storage.remove(dst)
            return None
        log.warning(
            "commit record %s changed while it was being quarantined and another record took its place; "
            "the changed one is kept at %s",
            storage.path(src),
            storage.path(dst),
        )
    why = {"from": src, "moved_unix": time.time(), "reason": reason}
    storage.write_atomic(dst[: -len(".json")] + ".why.json", json.dumps(why, indent=1).encode())
    return dst


def quarantined_commit_partitions(storage: CacheStorage) -> list[str]:
    """Partitions that have records in ``quarantine/commits/`` (their attempts are never swept)."""
    return [p for p in storage.listdir(QUARANTINED_COMMITS_DIR) if storage.listdir(f"{QUARANTINED_COMMITS_DIR}/{p}")]


class PartitionAttempt:
    """One private attempt at publishing a partition.

    Usage::

        attempt = PartitionAttempt.start(storage, partition_id)
        write_shard(storage, attempt.shard_path(bucket), ...)
        entry = attempt.shard_entry(bucket, ...)           # checksums the files
        won = attempt.commit(record_without_tables...)      # exclusive create
    """

    def __init__(self, storage: CacheStorage, partition_id: str, attempt_id: str) -> None:
        self.storage = storage
        self.partition_id = partition_id
        self.attempt_id = attempt_id

    @classmethod
    def start(cls, storage: CacheStorage, partition_id: str, run_id: str = "") -> PartitionAttempt:
        attempt = cls(storage, partition_id, uuid.uuid4().hex[:16])
        info = {
            "partition_id": partition_id,
            "attempt_id": attempt.attempt_id,
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_unix": time.time(),
        }
        storage.write_atomic(f"{attempt.dir}/{ATTEMPT_INFO_FILE}", json.dumps(info).encode())
        return attempt

    @property
    def dir(self) -> str:
        return f"{ATTEMPTS_DIR}/{self.partition_id}/{self.attempt_id}"

    def shard_path(self, bucket: Bucket) -> str:
        return f"{self.dir}/{bucket.name}"

    def table_path(self, name: str) -> str:
        return f"{self.dir}/{name}.parquet"

    def checksum_dir(self, relpath: str) -> dict[str, FileChecksum]:
        """Checksums of every file under `relpath` (paths relative to it)."""
        files = {}
        for rel in self.storage.walk_files(relpath):
            sha, size = self.storage.sha256(f"{relpath}/{rel}")
            files[rel] = FileChecksum(sha, size)
        if not files:
            raise CommitError(f"{self.storage.path(relpath)}: no files to checksum")
        return files

    def shard_entry(self, bucket: Bucket, *, num_samples: int, latent_channels: int, text_dim: int) -> ShardEntry:
        path = self.shard_path(bucket)
        return ShardEntry(
            shard_id=f"{self.partition_id}-{bucket.name}",
            path=path,
            height_px=bucket.height_px,
            width_px=bucket.width_px,
            latent_height=bucket.latent_height,
            latent_width=bucket.latent_width,
            latent_channels=latent_channels,
            text_dim=text_dim,
            num_samples=num_samples,
            files=self.checksum_dir(path),
        )

    def table_entry(self, name: str) -> dict:
        path = self.table_path(name)
        sha, size = self.storage.sha256(path)
        return {"path": path, "sha256": sha, "bytes": size}

    def commit(self, record: CommitRecord) -> bool:
        """Publish `record` by exclusive create. True: this attempt won, its shards are visible.

        False: another attempt committed the partition first; this attempt's files are deleted.
        """
        if record.partition_id != self.partition_id or record.attempt_id != self.attempt_id:
            raise CommitError(
                f"commit record names partition {record.partition_id}/{record.attempt_id}, "
                f"attempt is {self.partition_id}/{self.attempt_id}"
            )
        data = record.to_json()
        won = self.storage.write_exclusive(commit_path(self.partition_id), data)
        if not won and self._displace_unreadable_record():
            won = self.storage.write_exclusive(commit_path(self.partition_id), data)
        if not won:
            self.abandon()
        return won

    def _displace_unreadable_record(self) -> bool:
        """If the partition's slot holds an unusable record (which counts as not committed), move
        it to quarantine so that this attempt can commit; True if it was moved."""
        rel = commit_path(self.partition_id)
        try:
            data = self.storage.read_bytes(rel)
            parse_commit(self.storage, self.partition_id, data)
            return False
        except FileNotFoundError:
            return True  # gone in between (quarantined by another process): try again
        except (CommitRecordError, CachePathError) as exc:
            moved = quarantine_commit(
                self.storage,
                self.partition_id,
                expected=data,
                reason=f"attempt {self.attempt_id} re-produced the partition: {exc}",
            )
            if moved is not None:
                log.warning(
                    "partition %s re-produced: its unreadable commit record %s was moved to %s (%s)",
                    self.partition_id,
                    self.storage.path(rel),
                    self.storage.path(moved),
                    exc,
                )
            return True

    def abandon(self) -> None:
        """Delete this attempt's private files."""
        self.storage.remove(self.dir)


def referenced_attempt_dirs(records: Iterable[CommitRecord]) -> set[tuple[str, ...]]:
    """``(partition, attempt)`` of every attempt directory the records name (their own attempt and
    every shard or table path under ``attempts/``); shorter tuples for paths that name a whole
    partition (or all of ``attempts/``)."""
    refs: set[tuple[str, ...]] = set()
    for rec in records:
        refs.add((rec.partition_id, rec.attempt_id))
        paths = [s.path for s in rec.shards]
        paths += [t["path"] for t in rec.tables.values() if isinstance(t, dict) and isinstance(t.get("path"), str)]
        for path in paths:
            parts = path.split("/")
            if parts[0] == ATTEMPTS_DIR:
                refs.add(tuple(parts[1:3]))
    return refs


def attempt_dirs_in_text(data: bytes) -> set[tuple[str, ...]]:
    """Every ``attempts/<partition>/<attempt>`` spelled out in the bytes of an unparseable file."""
    return {
        (m.group(1).decode(errors="replace"), m.group(2).decode(errors="replace"))
        for m in _ATTEMPT_DIR_IN_TEXT.finditer(data)
    }


def committed_partitions(storage: CacheStorage) -> set[str]:
    """Partition ids that have a file in ``commits/`` (readable or not)."""
    return set(commit_record_names(storage))


def iter_shards(records: Iterable[CommitRecord]) -> Iterable[ShardEntry]:
    for rec in records:
        yield from rec.shards
