"""The latent-cache data contract shared by producers and consumers (no Ray needed).

* `shard_format`: one shard on disk (zarr v3 tensors + parquet samples table), schema version.
* `commit`: exactly-once publication of a partition (private attempts, exclusive commit record).
* `manifest`: `open_cache(path).snapshot(pin)` -> shards -> tensors.
* `verify`: re-hash committed shards against their checksums, check snapshots against the commit
  records; `repair_cache` moves unreadable records and snapshots to ``quarantine/``.

docs/cache_format.md describes the format for readers that use plain zarr/pyarrow.
"""

from megatron_qwenimage.data.commit import CommitError, CommitRecordError
from megatron_qwenimage.data.manifest import (
    Cache,
    CacheError,
    CachePathError,
    Sample,
    Shard,
    ShardBatch,
    ShardChecksumError,
    Snapshot,
    SnapshotError,
    init_cache,
    open_cache,
)
from megatron_qwenimage.data.shard_format import SCHEMA_VERSION, Bucket, SampleMeta, ShardTensors
from megatron_qwenimage.data.verify import RepairReport, VerifyReport, repair_cache, verify_cache, verify_snapshot

__all__ = [
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
    "VerifyReport",
    "init_cache",
    "open_cache",
    "repair_cache",
    "verify_cache",
    "verify_snapshot",
]
