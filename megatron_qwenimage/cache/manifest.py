"""Reading a latent cache: committed shards, pinned manifest snapshots, tensors per sample.

Consumers import this module without Ray::

    from megatron_qwenimage.cache import open_cache

    cache = open_cache("/data/cache")
    snap = cache.snapshot()            # newest snapshot; cache.snapshot(pin=3) pins version 3
    for shard in snap.shards:
        shard.bucket                   # Bucket(height_px, width_px), latent h/w = px / 8
        batch = shard.read_all()       # ShardBatch: latents bf16 [N, C, h, w], text (unpadded)...
        sample = shard.read_sample(0)  # Sample: latents [C, h, w], text_embedding [L, D]...

A *snapshot* (``manifest/snapshots/v00000007.json``) is an immutable, self-contained list of
committed shards with their checksums. Producers add one after each run (`Cache.create_snapshot`);
training pins a version so that its data does not change under it while the cache grows.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import torch

from megatron_qwenimage.cache.commit import (
    QUARANTINE_DIR,
    CommitRecord,
    CommitRecordError,
    ShardEntry,
    attempt_dirs_in_text,
    commit_path,
    list_commits,
    read_all_commits,
    referenced_attempt_dirs,
)
from megatron_qwenimage.cache.shard_format import (
    SCHEMA_VERSION,
    Bucket,
    ShardTensors,
    read_samples,
    read_tensors,
)
from megatron_qwenimage.cache.storage import (  # CacheError, CachePathError: defined there, re-exported here
    CacheError,
    CachePathError,  # noqa: F401
    CacheStorage,
    resolve_record_path,
)

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = "manifest/snapshots"
#: Unreadable snapshots moved aside by `qwenimage cache repair` (same file names); their version
#: numbers are never reused.
QUARANTINED_SNAPSHOTS_DIR = f"{QUARANTINE_DIR}/snapshots"
CACHE_INFO_FILE = "cache.json"
#: ``format`` of ``cache.json``.
CACHE_FORMAT = "megatron-qwenimage latent cache"
_SNAPSHOT_NAME = re.compile(r"^v(\d{8,})\.json$")


class ShardChecksumError(CacheError):
    """A committed shard's file does not match its recorded checksum (names shard and file)."""


@dataclass
class Sample:
    """One sample read from a shard.

    Attributes:
        latents: bf16 [C, h, w] normalised VAE latents of the target image.
        text_embedding: bf16 [text_len, D] text conditioning, unpadded.
        condition_latents: bf16 [C, h, w] latents of the edit source image (edit only), else None.
        metadata: the sample's row of ``samples.parquet`` (sample_id, task, caption, text_len...).
    """

    latents: torch.Tensor
    text_embedding: torch.Tensor
    condition_latents: torch.Tensor | None
    metadata: dict

    @property
    def sample_id(self) -> str:
        return self.metadata["sample_id"]

    @property
    def task(self) -> str:
        return self.metadata["task"]


@dataclass
class ShardBatch:
    """A whole shard in memory: `tensors` (see `ShardTensors`) plus the samples table."""

    tensors: ShardTensors
    samples: pa.Table

    @property
    def latents(self) -> torch.Tensor:
        return self.tensors.latents

    @property
    def text_embeddings(self) -> torch.Tensor:
        return self.tensors.text_embeddings

    @property
    def text_offsets(self) -> torch.Tensor:
        return self.tensors.text_offsets

    @property
    def text_lengths(self) -> torch.Tensor:
        return self.tensors.text_lengths

    @property
    def condition_latents(self) -> torch.Tensor | None:
        return self.tensors.condition_latents


class Shard:
    """A committed shard (read-only view).

    Args:
        record: names the commit record or snapshot that lists the shard (in error messages).
    """

    def __init__(self, storage: CacheStorage, entry: ShardEntry, record: str = "") -> None:
        self.storage = storage
        self.entry = entry
        self.record = record or f"the commit record of shard {entry.shard_id}"

    def __repr__(self) -> str:
        return f"Shard({self.shard_id}, bucket={self.bucket.name}, num_samples={self.num_samples})"

    @property
    def shard_id(self) -> str:
        return self.entry.shard_id

    @property
    def path(self) -> str:
        """The shard directory relative to the cache root, checked on every use to lie inside it
        (also after resolving symbolic links); `CachePathError` naming the record otherwise."""
        return resolve_record_path(
            self.storage, self.entry.path, record=self.record, entry=f"shard {self.shard_id} path"
        )

    @property
    def bucket(self) -> Bucket:
        return self.entry.bucket

    @property
    def num_samples(self) -> int:
        return self.entry.num_samples

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of every latent in the shard."""
        return (self.entry.latent_channels, self.entry.latent_height, self.entry.latent_width)

    @cached_property
    def samples(self) -> pa.Table:
        """The ``samples.parquet`` table: sample_id, task, caption, text_len, text_offset..."""
        return read_samples(self.storage, self.path)

    def read_all(self) -> ShardBatch:
        return ShardBatch(read_tensors(self.storage, self.path), self.samples)

    def read_sample(self, i: int) -> Sample:
        t = read_tensors(self.storage, self.path, index=i)
        meta = self.samples.slice(i, 1).to_pylist()[0]
        cond = None
        if t.condition_latents is not None and meta["task"] == "edit":
            cond = t.condition_latents[0]
        return Sample(t.latents[0], t.text_embeddings, cond, meta)

    def verify(self) -> None:
        """Re-hash every file; raise `ShardChecksumError` naming the shard on any mismatch."""
        path = self.path
        if not self.storage.exists(path):
            raise ShardChecksumError(f"shard {self.shard_id}: directory {self.storage.path(path)} does not exist")
        listed = set(self.entry.files)
        present = set(self.storage.walk_files(path))
        missing = sorted(listed - present)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ShardChecksumError(f"shard {self.shard_id} ({path}): missing files {missing[:3]}{more}")
        for rel, expected in sorted(self.entry.files.items()):
            file = resolve_record_path(
                self.storage, f"{path}/{rel}", record=self.record, entry=f"shard {self.shard_id} file {rel!r}"
            )
            sha, size = self.storage.sha256(file)
            if (sha, size) != (expected.sha256, expected.bytes):
                raise ShardChecksumError(
                    f"shard {self.shard_id}: file {path}/{rel} has sha256 {sha[:16]}... "
                    f"({size} bytes), the commit record says {expected.sha256[:16]}... ({expected.bytes} bytes)"
                )
        n_rows = self.samples.num_rows
        if n_rows != self.num_samples:
            raise ShardChecksumError(
                f"shard {self.shard_id}: samples.parquet has {n_rows} rows, expected {self.num_samples}"
            )


class Snapshot:
    """An immutable list of committed shards that a consumer pins by `version`."""

    def __init__(self, storage: CacheStorage, version: int, records: list[CommitRecord], created_unix: float) -> None:
        self.storage = storage
        self.version = version
        self.records = records
        self.created_unix = created_unix
        self.shards = [Shard(storage, e, self.record_name(rec)) for rec in records for e in rec.shards]

    def record_name(self, record: CommitRecord) -> str:
        """Where `record` was read from, for error messages: the snapshot file or the commit record."""
        if self.version < 0:  # live view: read from commits/
            return f"commit record {self.storage.path(commit_path(record.partition_id))}"
        return f"snapshot v{self.version} ({self.storage.path(snapshot_path(self.version))}) partition {record.partition_id}"

    def __repr__(self) -> str:
        return f"Snapshot(v{self.version}, {len(self.shards)} shards, {self.num_samples} samples)"

    @property
    def partitions(self) -> list[str]:
        return [r.partition_id for r in self.records]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def samples_per_bucket(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.shards:
            counts[s.bucket.name] = counts.get(s.bucket.name, 0) + s.num_samples
        return dict(sorted(counts.items()))

    def to_json(self) -> bytes:
        d = {
            "schema_version": SCHEMA_VERSION,
            "version": self.version,
            "created_unix": self.created_unix,
            "commits": [json.loads(r.to_json()) for r in self.records],
        }
        return json.dumps(d, sort_keys=True).encode()


def snapshot_path(version: int) -> str:
    return f"{SNAPSHOTS_DIR}/v{version:08d}.json"


def snapshot_file_versions(storage: CacheStorage, directory: str = SNAPSHOTS_DIR) -> list[int]:
    """Versions of the snapshot files in `directory` (``vNNNNNNNN.json``; other names are ignored)."""
    versions = []
    for name in storage.listdir(directory):
        m = _SNAPSHOT_NAME.match(name)
        if m and name == f"v{int(m.group(1)):08d}.json":
            versions.append(int(m.group(1)))
    return sorted(versions)


class SnapshotError(CacheError):
    """A snapshot file exists but cannot be used (not JSON, not the snapshot schema); names it."""


class SnapshotRefusedError(CacheError):
    """No snapshot was written: it would have left out committed shards (names the records)."""


def refuse_unreadable_commits(storage: CacheStorage, unreadable: dict[str, Exception]) -> None:
    """`SnapshotRefusedError` naming the `unreadable` commit records (partition id -> error), if any:
    a snapshot without them would silently drop the shards they commit, which older snapshots (and
    the readers that move to the newest one) may hold."""
    if not unreadable:
        return
    paths = [storage.path(commit_path(p)) for p in sorted(unreadable)]
    named = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    raise SnapshotRefusedError(
        f"cache {storage.url}: no snapshot written: {len(paths)} commit record(s) cannot be read ({named}), "
        "and a snapshot without them would lose their committed shards; `qwenimage cache verify` says why, "
        f"`qwenimage cache repair {storage.url}` moves them to {QUARANTINE_DIR}/commits/ and restores each "
        "one an older snapshot holds; then snapshot again"
    )


def read_snapshot(storage: CacheStorage, version: int) -> Snapshot:
    """Snapshot `version`, checked whole.

    Raises:
        FileNotFoundError: no such snapshot file.
        SnapshotError: naming the version and file (invalid JSON, wrong schema or version).
        CommitRecordError, CachePathError: a record in it is invalid or names a path outside the cache.
    """
    rel = snapshot_path(version)
    data = storage.read_bytes(rel)
    where = f"snapshot v{version} ({storage.path(rel)})"
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise SnapshotError(f"{where}: a JSON {type(d).__name__}, expected a snapshot object")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise SnapshotError(f"{where}: schema_version {d.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if d.get("version") != version:
        raise SnapshotError(f"{where}: says version {d.get('version')!r}, expected {version} (its file name)")
    commits, created = d.get("commits"), d.get("created_unix")
    if not isinstance(commits, list) or not isinstance(created, (int, float)) or isinstance(created, bool):
        raise SnapshotError(f"{where}: expected a 'commits' list and a 'created_unix' number")
    records = []
    for i, c in enumerate(commits):
        try:
            records.append(CommitRecord.from_json(json.dumps(c).encode(), where=f"{where} commits[{i}]"))
        except CommitRecordError as exc:
            raise SnapshotError(str(exc)) from exc
    partitions = [r.partition_id for r in records]
    if len(set(partitions)) != len(partitions):
        raise SnapshotError(f"{where}: lists a partition twice")
    return Snapshot(storage, version, records, float(created))


def snapshot_references(storage: CacheStorage) -> tuple[set[tuple[str, ...]], list[str]]:
    """Attempt directories that snapshots name, and the snapshots that could not be read.

    Returns ``(refs, unreadable)``: `refs` as `commit.referenced_attempt_dirs`; `unreadable` names
    every snapshot file that cannot be parsed (what it names is then not known for sure; the
    attempt paths spelled out in its bytes are in `refs` anyway) and every quarantined one.
    """
    refs: set[tuple[str, ...]] = set()
    unreadable: list[str] = []
    for version in snapshot_file_versions(storage):
        try:
            refs |= referenced_attempt_dirs(read_snapshot(storage, version).records)
        except FileNotFoundError:
            continue
        except CacheError as exc:  # SnapshotError, CachePathError
            unreadable.append(f"v{version} ({storage.path(snapshot_path(version))}: {exc})")
            refs |= attempt_dirs_in_text(storage.read_bytes(snapshot_path(version)))
    for name in storage.listdir(QUARANTINED_SNAPSHOTS_DIR):
        rel = f"{QUARANTINED_SNAPSHOTS_DIR}/{name}"
        if name.endswith(".json") and not name.endswith(".why.json"):
            unreadable.append(f"{storage.path(rel)} (quarantined; delete it once it is no longer needed)")
            refs |= attempt_dirs_in_text(storage.read_bytes(rel))
    return refs, unreadable


def quarantine_snapshot(storage: CacheStorage, version: int, reason: str = "") -> str:
    """Move snapshot `version` to ``quarantine/snapshots/`` (never deleted); returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dst = f"{QUARANTINED_SNAPSHOTS_DIR}/v{version:08d}.{stamp}-{uuid.uuid4().hex[:8]}.json"
    storage.move(snapshot_path(version), dst)
    why = {"from": snapshot_path(version), "moved_unix": time.time(), "reason": reason}
    storage.write_atomic(dst[: -len(".json")] + ".why.json", json.dumps(why, indent=1).encode())
    return dst


def quarantined_snapshot_versions(storage: CacheStorage) -> dict[int, str]:
    """Version -> cache-relative path of every snapshot in ``quarantine/snapshots/``."""
    found = {}
    for name in storage.listdir(QUARANTINED_SNAPSHOTS_DIR):
        m = re.match(r"^v(\d{8,})\..*\.json$", name)
        if m and not name.endswith(".why.json"):
            found[int(m.group(1))] = f"{QUARANTINED_SNAPSHOTS_DIR}/{name}"
    return found


class Cache:
    """A latent cache directory (local path or fsspec URL)."""

    def __init__(self, url: str) -> None:
        self.storage = CacheStorage(url)
        self.url = url

    def committed(self, *, strict: bool = False) -> list[CommitRecord]:
        """Live listing of every commit record (not pinned; prefer `snapshot`). An unreadable
        record is skipped with a warning naming it (its partition counts as not committed);
        `strict` raises instead."""
        return list_commits(self.storage, strict=strict)

    def snapshot_versions(self) -> list[int]:
        return snapshot_file_versions(self.storage)

    def snapshot(self, pin: int | None = None) -> Snapshot:
        """Snapshot `pin`, or the newest one.

        Raises:
            CacheError: it does not exist (naming the version and the ones that do), or it cannot
                be read (`SnapshotError`, `CachePathError`: naming the version, file and problem).
        """
        versions = self.snapshot_versions()
        if pin is None:
            if not versions:
                raise CacheError(
                    f"cache {self.url} has no manifest snapshot yet (a producer run writes one; "
                    f"or run `qwenimage cache snapshot {self.url}`)"
                )
            pin = versions[-1]
        try:
            return read_snapshot(self.storage, pin)
        except FileNotFoundError as exc:
            moved = quarantined_snapshot_versions(self.storage).get(pin)
            if moved is not None:
                raise CacheError(
                    f"cache {self.url}: snapshot v{pin} was unreadable and `qwenimage cache repair` "
                    f"moved it to {self.storage.path(moved)} (have {versions})"
                ) from exc
            raise CacheError(
                f"cache {self.url}: snapshot v{pin} does not exist "
                f"({self.storage.path(snapshot_path(pin))}; have {versions})"
            ) from exc

    def live(self, *, strict: bool = False) -> Snapshot:
        """An unpinned view of everything committed right now (version -1, not stored); see `committed`."""
        return Snapshot(self.storage, -1, self.committed(strict=strict), time.time())

    def create_snapshot(self) -> Snapshot:
        """Store a new snapshot of all commit records, unless the newest one already has them all.

        Versions are allocated by exclusive create, so concurrent producers never overwrite one
        another's snapshot, and never reuse the number of a quarantined one. If the newest snapshot
        cannot be read, a new one is written after it (a warning names it).

        Raises:
            SnapshotRefusedError: a commit record cannot be read (naming each): a snapshot without it
                would lose committed shards, so nothing is written (`qwenimage cache repair` first).
        """
        records, unreadable = read_all_commits(self.storage)
        refuse_unreadable_commits(self.storage, unreadable)
        while True:
            versions = self.snapshot_versions()
            if versions:
                try:
                    newest = read_snapshot(self.storage, versions[-1])
                except FileNotFoundError:
                    continue  # quarantined in between
                except CacheError as exc:
                    log.warning("newest snapshot cannot be read, writing a new one after it: %s", exc)
                else:
                    if set(newest.partitions) == {r.partition_id for r in records}:
                        return newest
            taken = versions + list(quarantined_snapshot_versions(self.storage))
            version = max(taken) + 1 if taken else 1
            snap = Snapshot(self.storage, version, records, time.time())
            if self.storage.write_exclusive(snapshot_path(version), snap.to_json()):
                return snap


def init_cache(path: str) -> Cache:
    """Create the cache at `path` if needed (writes ``cache.json``) and open it."""
    cache = Cache(str(path))
    fs, root = cache.storage.fs, cache.storage.root
    if fs.exists(root) and not fs.isdir(root):
        raise CacheError(f"cache {path}: is a file, expected a cache directory (or a path that does not exist yet)")
    cache.storage.makedirs("")
    info = {"schema_version": SCHEMA_VERSION, "created_unix": time.time(), "format": CACHE_FORMAT}
    cache.storage.write_exclusive(CACHE_INFO_FILE, json.dumps(info).encode())
    return open_cache(path)


def open_cache(path: str) -> Cache:
    """Open the existing cache at `path` (local directory or fsspec URL).

    Raises:
        CacheError: naming `path` (or its ``cache.json``) when it does not exist, is not a
            directory, is not a latent cache, or has a ``cache.json`` that is not valid JSON, not
            this format or another schema version.
    """
    cache = Cache(str(path))
    fs, root = cache.storage.fs, cache.storage.root
    expected = f"expected the directory that `qwenimage produce --output` wrote, with a {CACHE_INFO_FILE}"
    try:
        if not fs.exists(root):
            raise CacheError(f"{path} is not a latent cache: it does not exist; {expected}")
        if not fs.isdir(root):
            raise CacheError(f"{path} is not a latent cache: it is a file, not a directory; {expected}")
        data = cache.storage.read_bytes(CACHE_INFO_FILE)
    except FileNotFoundError as exc:
        raise CacheError(f"{path} is not a latent cache: it has no {CACHE_INFO_FILE}; {expected}") from exc
    except (IsADirectoryError, PermissionError, NotADirectoryError) as exc:
        raise CacheError(f"cache {path}: cannot read {CACHE_INFO_FILE} ({exc})") from exc
    info_path = cache.storage.path(CACHE_INFO_FILE)
    what = f'expected {{"schema_version": {SCHEMA_VERSION}, "format": "{CACHE_FORMAT}", ...}}'
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheError(f"{info_path}: not valid JSON ({exc}); {what}") from exc
    if not isinstance(info, dict):
        raise CacheError(f"{info_path}: a JSON {type(info).__name__}; {what}")
    if info.get("format", CACHE_FORMAT) != CACHE_FORMAT:
        raise CacheError(f"{info_path}: format {info.get('format')!r}; {what}")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"cache {path} has schema_version {info.get('schema_version')!r} ({info_path}); this reader knows "
            f"{SCHEMA_VERSION}"
        )
    return cache
