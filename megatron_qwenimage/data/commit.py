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
died half-way is invisible, and `sweep_orphans` removes what it left.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterable

from megatron_qwenimage.data.shard_format import SCHEMA_VERSION, Bucket
from megatron_qwenimage.data.storage import CacheStorage, resolve_record_path
from megatron_qwenimage.errors import UserError

COMMITS_DIR = "commits"
ATTEMPTS_DIR = "attempts"
ATTEMPT_INFO_FILE = "attempt.json"
#: Orphans younger than this are left alone by default: they may belong to a live producer.
DEFAULT_SWEEP_GRACE_S = 3600.0


class CommitError(UserError, RuntimeError):
    """A commit record or an attempt is malformed; the message names it."""


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
    def from_dict(cls, d: dict) -> "ShardEntry":
        d = dict(d)
        d["files"] = {k: FileChecksum(**v) for k, v in d["files"].items()}
        return cls(**d)


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
    def from_json(cls, data: bytes, where: str = "commit record") -> "CommitRecord":
        try:
            d = json.loads(data)
            if d.get("schema_version") != SCHEMA_VERSION:
                raise CommitError(
                    f"{where}: schema_version {d.get('schema_version')!r}, this reader knows {SCHEMA_VERSION}"
                )
            d["shards"] = [ShardEntry.from_dict(s) for s in d["shards"]]
            record = cls(**d)
            record.check_paths(where)  # CachePathError naming the record and the entry
            return record
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CommitError(f"{where}: not a valid commit record ({exc})") from exc

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
    return f"{COMMITS_DIR}/{partition_id}.json"


def read_commit(storage: CacheStorage, partition_id: str) -> CommitRecord | None:
    """The commit record of `partition_id`, or None if it is not committed."""
    rel = commit_path(partition_id)
    try:
        data = storage.read_bytes(rel)
    except FileNotFoundError:
        return None
    return CommitRecord.from_json(data, where=f"commit record {storage.path(rel)}")


def list_commits(storage: CacheStorage) -> list[CommitRecord]:
    """Every commit record of the cache, sorted by partition id."""
    records = []
    for name in storage.listdir(COMMITS_DIR):
        if name.endswith(".json") and ".tmp-" not in name:
            rec = read_commit(storage, name[: -len(".json")])
            if rec is not None:
                records.append(rec)
    return records


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
    def start(cls, storage: CacheStorage, partition_id: str, run_id: str = "") -> "PartitionAttempt":
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
        won = self.storage.write_exclusive(commit_path(self.partition_id), record.to_json())
        if not won:
            self.abandon()
        return won

    def abandon(self) -> None:
        """Delete this attempt's private files."""
        self.storage.remove(self.dir)


@dataclass
class SweepReport:
    removed_attempts: list[str]
    kept_in_flight: list[str]


def sweep_orphans(storage: CacheStorage, grace_s: float = DEFAULT_SWEEP_GRACE_S, now: float | None = None) -> SweepReport:
    """Delete attempt directories that can never become visible.

    * attempts of a committed partition other than the winner: removed at once (they can
      no longer commit);
    * attempts of an uncommitted partition: removed once older than `grace_s` seconds (a dead
      attempt); younger ones may belong to a live producer and are kept.
    * stray temporary files of the exclusive create in ``commits/`` older than `grace_s`.
    """
    now = time.time() if now is None else now
    removed, kept = [], []
    for partition_id in storage.listdir(ATTEMPTS_DIR):
        record = read_commit(storage, partition_id)
        for attempt_id in storage.listdir(f"{ATTEMPTS_DIR}/{partition_id}"):
            rel = f"{ATTEMPTS_DIR}/{partition_id}/{attempt_id}"
            if record is not None:
                if attempt_id != record.attempt_id:
                    storage.remove(rel)
                    removed.append(rel)
                continue
            if now - _attempt_started(storage, rel) >= grace_s:
                storage.remove(rel)
                removed.append(rel)
            else:
                kept.append(rel)
        if not storage.listdir(f"{ATTEMPTS_DIR}/{partition_id}"):
            storage.remove(f"{ATTEMPTS_DIR}/{partition_id}")
    for name in storage.listdir(COMMITS_DIR):
        if ".tmp-" in name:
            rel = f"{COMMITS_DIR}/{name}"
            if now - storage.fs.modified(storage.path(rel)).timestamp() >= grace_s:
                storage.remove(rel)
                removed.append(rel)
    return SweepReport(removed, kept)


def _attempt_started(storage: CacheStorage, attempt_dir: str) -> float:
    """Start time of an attempt; an attempt without a readable info file counts as ancient."""
    try:
        return float(json.loads(storage.read_bytes(f"{attempt_dir}/{ATTEMPT_INFO_FILE}"))["started_unix"])
    except (FileNotFoundError, ValueError, KeyError):
        pass
    try:  # info not written yet (or lost): fall back to the directory's own age
        return storage.fs.modified(storage.path(attempt_dir)).timestamp()
    except (FileNotFoundError, NotImplementedError, OSError, AttributeError):
        return 0.0


def committed_partitions(storage: CacheStorage) -> set[str]:
    return {name[: -len(".json")] for name in storage.listdir(COMMITS_DIR) if name.endswith(".json") and ".tmp-" not in name}


def iter_shards(records: Iterable[CommitRecord]) -> Iterable[ShardEntry]:
    for rec in records:
        yield from rec.shards
