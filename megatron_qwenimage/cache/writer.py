"""Write and publish one partition: shards per bucket + quarantine/duplicate tables + commit.

`publish_partition` is the whole producer-side write path in one call: a private attempt, one
shard per bucket, a read-back check that the stored tensors equal the in-memory ones bit for
bit, SHA-256 checksums of every file, then the exclusive commit record (`commit`). It needs no
Ray, so tests and tools can build small caches with it too.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from megatron_qwenimage.cache.commit import CommitRecord, PartitionAttempt, commit_path, read_commit
from megatron_qwenimage.cache.shard_format import (
    Bucket,
    SampleMeta,
    ShardFormatError,
    ShardTensors,
    read_parquet,
    read_tensors,
    write_shard,
)
from megatron_qwenimage.cache.storage import CacheStorage, resolve_record_path

#: One row per quarantined input.
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("input_id", pa.string(), nullable=False),  # stable id of the input in its source
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # e.g. "missing_file", "corrupt_image"
        pa.field("detail", pa.string(), nullable=False),  # human-readable explanation
    ]
)
#: One row per input skipped because the same content is committed (by another partition, or
#: by an earlier input of the same partition).
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("input_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        # committed partition whose shards hold a sample with content_hash (this partition itself
        # for a copy inside the partition); never a partition that is not committed
        pa.field("duplicate_of", pa.string(), nullable=False),
    ]
)


@dataclass
class ShardPayload:
    """What goes into one shard: a bucket, its tensors and one metadata row per sample."""

    bucket: Bucket
    tensors: ShardTensors
    samples: list[SampleMeta]


@dataclass
class QuarantineRow:
    input_id: str
    source_uri: str
    reason: str
    detail: str


@dataclass
class DuplicateRow:
    input_id: str
    source_uri: str
    content_hash: str
    duplicate_of: str


@dataclass
class PublishResult:
    """`won`: this call's attempt made the partition visible; `record`: the partition's commit
    record (this attempt's when it won, the winning attempt's otherwise)."""

    won: bool
    record: CommitRecord
    bytes_written: int = 0
    shard_ids: list[str] = field(default_factory=list)


FaultHook = Callable[[str], None]


def _table_bytes(rows: Sequence, schema: pa.Schema) -> bytes:
    cols = {f.name: [getattr(r, f.name) for r in rows] for f in schema}
    buf = io.BytesIO()
    pq.write_table(pa.table(cols, schema=schema), buf, compression="zstd")
    return buf.getvalue()


def _check_read_back(storage: CacheStorage, relpath: str, expected: ShardTensors) -> None:
    got = read_tensors(storage, relpath)
    pairs = [
        ("latents", got.latents, expected.latents),
        ("text_embeddings", got.text_embeddings, expected.text_embeddings),
    ]
    pairs.append(("text_offsets", got.text_offsets, expected.text_offsets.to(torch.int64)))
    if expected.condition_latents is not None and got.condition_latents is not None:
        pairs.append(("condition_latents", got.condition_latents, expected.condition_latents))
    for name, a, b in pairs:
        if a.shape != b.shape or not torch.equal(
            a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
            b.view(torch.int16) if b.dtype == torch.bfloat16 else b,
        ):
            raise ShardFormatError(f"shard {relpath}: {name} read back differs from what was written")


def publish_partition(
    storage: CacheStorage,
    partition_id: str,
    *,
    inputs: int,
    shards: Sequence[ShardPayload],
    quarantine: Sequence[QuarantineRow] = (),
    duplicates: Sequence[DuplicateRow] = (),
    committed: int | None = None,
    encoder_version: str = "",
    run_id: str = "",
    metadata: dict[str, str] | None = None,
    fault_hook: FaultHook | None = None,
) -> PublishResult:
    """Write one partition privately, verify it, and try to commit it.

    Args:
        inputs: how many inputs the partition has; must equal committed + duplicates + quarantined.
        shards: one payload per bucket (a sample encoded at several areas appears in several).
        committed: committed inputs (default: distinct sample_ids over `shards`).
        fault_hook: test hook called with "shard_written" after each shard and "before_commit"
            just before the exclusive create (fault injection kills the process there).
    Returns:
        `PublishResult`; ``won`` is False when another attempt committed the partition first
        (before or while this one wrote; its record is returned), in which case this attempt's
        files are already deleted.
    """
    if committed is None:
        committed = len({s.sample_id for p in shards for s in p.samples})
    quarantined: dict[str, int] = {}
    for row in quarantine:
        quarantined[row.reason] = quarantined.get(row.reason, 0) + 1
    buckets = [p.bucket for p in shards]
    if len(set(buckets)) != len(buckets):
        raise ShardFormatError(f"partition {partition_id}: two payloads for the same bucket {buckets}")

    attempt = PartitionAttempt.start(storage, partition_id, run_id=run_id)
    try:
        entries = []
        for payload in shards:
            rel = attempt.shard_path(payload.bucket)
            write_shard(
                storage,
                rel,
                payload.bucket,
                payload.tensors,
                payload.samples,
                metadata={"partition_id": partition_id, "encoder_version": encoder_version, **(metadata or {})},
            )
            _check_read_back(storage, rel, payload.tensors)
            entries.append(
                attempt.shard_entry(
                    payload.bucket,
                    num_samples=len(payload.samples),
                    latent_channels=int(payload.tensors.latents.shape[1]),
                    text_dim=int(payload.tensors.text_embeddings.shape[1]),
                )
            )
            if fault_hook is not None:
                fault_hook("shard_written")
        storage.write_atomic(attempt.table_path("quarantine"), _table_bytes(quarantine, QUARANTINE_SCHEMA))
        storage.write_atomic(attempt.table_path("duplicates"), _table_bytes(duplicates, DUPLICATES_SCHEMA))
        record = CommitRecord(
            partition_id=partition_id,
            attempt_id=attempt.attempt_id,
            inputs=inputs,
            committed=committed,
            duplicates=len(duplicates),
            quarantined=dict(sorted(quarantined.items())),
            shards=entries,
            tables={"quarantine": attempt.table_entry("quarantine"), "duplicates": attempt.table_entry("duplicates")},
            encoder_version=encoder_version,
            run_id=run_id,
        )
        # The shard data (zarr chunks, parquet tables) must be on disk before a record names it:
        # a commit that survives a power loss must never point at files that did not.
        storage.sync_tree(attempt.dir)
        if fault_hook is not None:
            fault_hook("before_commit")
        won = attempt.commit(record)
    except BaseException as exc:
        # Leave the files for the orphan sweep if we are being killed; delete them otherwise.
        try:
            attempt.abandon()
        except Exception:
            pass
        # Another attempt may have won while this one was writing; the sweep of a committed
        # partition then removes this attempt's files under it. The partition is published
        # exactly once either way: report the loss instead of failing.
        winner = read_commit(storage, partition_id) if isinstance(exc, Exception) else None
        if winner is not None and winner.attempt_id != attempt.attempt_id:
            return PublishResult(False, winner)
        raise
    if not won:
        return PublishResult(False, read_commit(storage, partition_id) or record)
    nbytes = sum(f.bytes for e in entries for f in e.files.values())
    nbytes += record.tables["quarantine"]["bytes"] + record.tables["duplicates"]["bytes"]
    return PublishResult(True, record, nbytes, [e.shard_id for e in entries])


def _read_table(storage: CacheStorage, record: CommitRecord, name: str) -> pa.Table:
    path = resolve_record_path(
        storage,
        record.tables[name]["path"],
        entry=f"tables.{name}.path",
        record=f"commit record {storage.path(commit_path(record.partition_id))}",
    )
    return read_parquet(storage, path)


def read_quarantine(storage: CacheStorage, record: CommitRecord) -> pa.Table:
    """The quarantine table of a committed partition."""
    return _read_table(storage, record, "quarantine")


def read_duplicates(storage: CacheStorage, record: CommitRecord) -> pa.Table:
    return _read_table(storage, record, "duplicates")
