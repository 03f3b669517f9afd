"""Reading a latent cache: committed shards, pinned manifest snapshots, tensors per sample.

Consumers import this module without Ray::

    from megatron_qwenimage.data import open_cache

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
import time
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import torch

from megatron_qwenimage.data.commit import CommitRecord, ShardEntry, commit_path, list_commits
from megatron_qwenimage.data.shard_format import (
    SCHEMA_VERSION,
    Bucket,
    ShardTensors,
    read_samples,
    read_tensors,
)
from megatron_qwenimage.data.storage import (  # CacheError, CachePathError: defined there, re-exported here
    CacheError,
    CachePathError,  # noqa: F401
    CacheStorage,
    resolve_record_path,
)

SNAPSHOTS_DIR = "manifest/snapshots"
CACHE_INFO_FILE = "cache.json"


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
        return resolve_record_path(self.storage, self.entry.path, record=self.record,
                                   entry=f"shard {self.shard_id} path")

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
        listed = set(self.entry.files)
        present = set(self.storage.walk_files(path))
        if listed - present:
            raise ShardChecksumError(f"shard {self.shard_id} ({path}): missing files {sorted(listed - present)}")
        for rel, expected in sorted(self.entry.files.items()):
            file = resolve_record_path(self.storage, f"{path}/{rel}", record=self.record,
                                       entry=f"shard {self.shard_id} file {rel!r}")
            sha, size = self.storage.sha256(file)
            if (sha, size) != (expected.sha256, expected.bytes):
                raise ShardChecksumError(
                    f"shard {self.shard_id}: file {path}/{rel} has sha256 {sha[:16]}... "
                    f"({size} bytes), the commit record says {expected.sha256[:16]}... ({expected.bytes} bytes)"
                )
        n_rows = self.samples.num_rows
        if n_rows != self.num_samples:
            raise ShardChecksumError(f"shard {self.shard_id}: samples.parquet has {n_rows} rows, expected {self.num_samples}")


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


class Cache:
    """A latent cache directory (local path or fsspec URL)."""

    def __init__(self, url: str) -> None:
        self.storage = CacheStorage(url)
        self.url = url

    def committed(self) -> list[CommitRecord]:
        """Live listing of every commit record (not pinned; prefer `snapshot`)."""
        return list_commits(self.storage)

    def snapshot_versions(self) -> list[int]:
        versions = []
        for name in self.storage.listdir(SNAPSHOTS_DIR):
            if name.startswith("v") and name.endswith(".json") and ".tmp-" not in name:
                versions.append(int(name[1:-5]))
        return sorted(versions)

    def snapshot(self, pin: int | None = None) -> Snapshot:
        """Snapshot `pin`, or the newest one. Raises `CacheError` if it does not exist."""
        versions = self.snapshot_versions()
        if pin is None:
            if not versions:
                raise CacheError(
                    f"cache {self.url} has no manifest snapshot yet (a producer run writes one; "
                    f"or run `qwenimage cache snapshot {self.url}`)"
                )
            pin = versions[-1]
        rel = snapshot_path(pin)
        try:
            d = json.loads(self.storage.read_bytes(rel))
        except FileNotFoundError as exc:
            raise CacheError(f"cache {self.url}: snapshot v{pin} does not exist (have {versions})") from exc
        if d.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{self.storage.path(rel)}: schema_version {d.get('schema_version')}, expected {SCHEMA_VERSION}")
        where = f"snapshot v{pin} ({self.storage.path(rel)})"
        records = [CommitRecord.from_json(json.dumps(c).encode(), where=f"{where} commits[{i}]")
                   for i, c in enumerate(d["commits"])]
        return Snapshot(self.storage, d["version"], records, d["created_unix"])

    def live(self) -> Snapshot:
        """An unpinned view of everything committed right now (version -1, not stored)."""
        return Snapshot(self.storage, -1, self.committed(), time.time())

    def create_snapshot(self) -> Snapshot:
        """Store a new snapshot of all commit records, unless the newest one already has them all.

        Versions are allocated by exclusive create, so concurrent producers never overwrite one
        another's snapshot.
        """
        records = self.committed()
        while True:
            versions = self.snapshot_versions()
            if versions:
                newest = self.snapshot(versions[-1])
                if set(newest.partitions) == {r.partition_id for r in records}:
                    return newest
            version = (versions[-1] + 1) if versions else 1
            snap = Snapshot(self.storage, version, records, time.time())
            if self.storage.write_exclusive(snapshot_path(version), snap.to_json()):
                return snap


def init_cache(path: str) -> Cache:
    """Create the cache at `path` if needed (writes ``cache.json``) and open it."""
    cache = Cache(str(path))
    cache.storage.makedirs("")
    info = {"schema_version": SCHEMA_VERSION, "created_unix": time.time(), "format": "megatron-qwenimage latent cache"}
    cache.storage.write_exclusive(CACHE_INFO_FILE, json.dumps(info).encode())
    return open_cache(path)


def open_cache(path: str) -> Cache:
    """Open the existing cache at `path` (local directory or fsspec URL)."""
    cache = Cache(str(path))
    try:
        info = json.loads(cache.storage.read_bytes(CACHE_INFO_FILE))
    except FileNotFoundError as exc:
        raise CacheError(f"{path} is not a latent cache (no {CACHE_INFO_FILE})") from exc
    if info.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"cache {path} has schema_version {info.get('schema_version')!r}; this reader knows {SCHEMA_VERSION}"
        )
    return cache
