"""The latent-cache contract: what producers write and consumers read (no Ray, no training code).

A cache is a directory (local path or fsspec URL) of immutable shards, published a partition at a
time and read through numbered snapshots. docs/cache_format.md specifies it for anyone who
implements a writer or reader with plain zarr/pyarrow; this package is the reference
implementation:

* `storage`: `CacheStorage`, the fsspec-backed file operations (atomic and exclusive writes).
* `shard_format`: one shard on disk (zarr v3 tensors + parquet samples table), schema version,
  the stored sample kinds (`SAMPLE_KINDS`) and the bfloat16 <-> uint16 bit-pattern packing.
* `shard_access`: direct reads of the zarr v3 sharded layout `shard_format` writes.
* `commit`: exactly-once publication of a partition (private attempts, exclusive commit record
  at `commit.commit_path`).
* `writer`: `publish_partition`, one partition's shards + quarantine/duplicate tables -> commit.
* `manifest`: `open_cache(path).snapshot(pin)` -> shards -> tensors; `init_cache`.
* `verify`: re-hash committed shards against their checksums, check snapshots against the commit
  records; `repair_cache` moves unreadable records and snapshots to ``quarantine/``.

The training reader built on top of it lives in `megatron_qwenimage.data`.
"""

from megatron_qwenimage.cache.commit import CommitError, CommitRecordError
from megatron_qwenimage.cache.manifest import (
    Cache,
    CacheError,
    CachePathError,
    Sample,
    Shard,
    ShardBatch,
    ShardChecksumError,
    Snapshot,
    SnapshotError,
    SnapshotRefusedError,
    init_cache,
    open_cache,
)
from megatron_qwenimage.cache.shard_format import SAMPLE_KINDS, SCHEMA_VERSION, Bucket, SampleMeta, ShardTensors
from megatron_qwenimage.cache.verify import RepairReport, VerifyReport, repair_cache, verify_cache, verify_snapshot

__all__ = [
    "SAMPLE_KINDS",
    "SCHEMA_VERSION",
    "Bucket",
    "Cache",
    "CacheError",
    "CachePathError",
    "CommitError",
    "CommitRecordError",
    "RepairReport",
    "Sample",
    "SampleMeta",
    "Shard",
    "ShardBatch",
    "ShardChecksumError",
    "ShardTensors",
    "Snapshot",
    "SnapshotError",
    "SnapshotRefusedError",
    "VerifyReport",
    "init_cache",
    "open_cache",
    "repair_cache",
    "verify_cache",
    "verify_snapshot",
]
