"""Turn one partition's encoded rows into shards and publish them exactly once (a Ray task)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from megatron_qwenimage.cache.commit import CommitRecord, read_commit
from megatron_qwenimage.cache.shard_format import (
    TENSORS_DIR,
    Bucket,
    SampleMeta,
    ShardTensors,
    bytes_to_bf16,
    offsets_from_lengths,
)
from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.cache.writer import DuplicateRow, QuarantineRow, ShardPayload, publish_partition
from producers.config import FaultConfig
from producers.dedup import repoint_claims, resolve_duplicates
from producers.row import ProducerRow


@dataclass
class PartitionOutcome:
    """What happened to one partition (from the winning commit record).

    Attributes:
        text_tokens: text-embedding rows of the committed samples (the sum of their ``text_len``).
        stage_seconds: per-sample stage seconds of this attempt's encode rows (``t_read``...).
        write_seconds: wall seconds of this `write_partition` call (0 for a record read back).
    """

    partition_id: str
    won: bool  # this producer's attempt is the committed one
    inputs: int
    committed: int
    duplicates: int
    quarantined: dict[str, int]
    buckets: dict[str, int]
    bytes_written: int = 0
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)
    text_tokens: int = 0
    write_seconds: float = 0.0


def record_text_tokens(storage: CacheStorage, record: CommitRecord) -> int:
    """Text tokens of a committed partition's samples, exactly, from one small file per shard.

    A shard's ``text_embeddings`` array is unpadded (T = the sum of its samples' ``text_len``),
    so its zarr metadata (``tensors.zarr/text_embeddings/zarr.json``, a few hundred bytes) has
    the sum as ``shape[0]``: cheaper than the samples table, and the commit record has no
    per-shard token count.
    """
    total = 0
    for shard in record.shards:
        meta = json.loads(storage.read_bytes(f"{shard.path}/{TENSORS_DIR}/text_embeddings/zarr.json"))
        total += int(meta["shape"][0])
    return total


def outcome_from_record(
    record: CommitRecord,
    *,
    won: bool,
    storage: CacheStorage | None,
    bytes_written: int = 0,
    text_tokens: int | None = None,
) -> PartitionOutcome:
    """The outcome a commit record says; `text_tokens` when known, else read from `storage`
    (`record_text_tokens`)."""
    buckets: dict[str, int] = {}
    for e in record.shards:
        buckets[e.bucket.name] = buckets.get(e.bucket.name, 0) + e.num_samples
    if text_tokens is None:
        if storage is None:
            raise ValueError("outcome_from_record: pass the storage or the text tokens")
        text_tokens = record_text_tokens(storage, record)
    return PartitionOutcome(
        record.partition_id,
        won,
        record.inputs,
        record.committed,
        record.duplicates,
        dict(record.quarantined),
        buckets,
        bytes_written,
        text_tokens=text_tokens,
    )


def _fault_hook(fault: FaultConfig):
    if not fault.kill_writer_at or fault.kill_scope != "worker":
        return None

    def hook(stage: str) -> None:
        if stage != fault.kill_writer_at:
            return
        try:
            fd = os.open(fault.once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(137)  # the worker dies mid-partition, as if OOM-killed

    return hook


def rows_to_payloads(
    rows: list[ProducerRow],
) -> tuple[list[ShardPayload], list[QuarantineRow], list[DuplicateRow], int]:
    """Group a partition's rows per input: quarantined if any of its rows is, duplicate, or
    encoded (one sample per area, grouped into one payload per bucket)."""
    by_input: dict[str, list[ProducerRow]] = {}
    for r in rows:
        by_input.setdefault(r["input_id"], []).append(r)
    quarantine, duplicates, encoded = [], [], []
    for input_id, group in by_input.items():
        bad = next((r for r in group if r["kind"] == "quarantine"), None)
        if bad is not None:
            quarantine.append(QuarantineRow(input_id, bad["source_uri"], bad["reason"], bad["detail"]))
        elif group[0]["kind"] == "duplicate":
            r = group[0]
            duplicates.append(DuplicateRow(input_id, r["source_uri"], r["content_hash"], r["duplicate_of"]))
        else:
            encoded.extend(group)
    per_bucket: dict[Bucket, list[ProducerRow]] = {}
    for r in sorted(encoded, key=lambda r: r["input_id"]):
        per_bucket.setdefault(Bucket(int(r["bucket_h"]), int(r["bucket_w"])), []).append(r)
    payloads = []
    for bucket, members in sorted(per_bucket.items()):
        c = int(members[0]["latent_c"])
        shape = (c, bucket.latent_height, bucket.latent_width)
        latents = torch.stack([bytes_to_bf16(r["latents"], shape) for r in members])
        text = torch.cat([bytes_to_bf16(r["text"], (int(r["text_len"]), int(r["text_dim"]))) for r in members])
        cond = None
        if any(r["task"] == "edit" for r in members):
            cond = torch.stack(
                [
                    bytes_to_bf16(r["cond_latents"], shape)
                    if r["task"] == "edit"
                    else torch.zeros(shape, dtype=torch.bfloat16)
                    for r in members
                ]
            )
        samples = [
            SampleMeta(
                r["content_hash"],
                r["task"],
                r["caption"],
                r["source_uri"],
                r["condition_uri"] or None,
                int(r["text_len"]),
                bool(r["text_truncated"]),
                int(r["orig_h"]),
                int(r["orig_w"]),
                int(r["crop_top"]),
                int(r["crop_left"]),
            )
            for r in members
        ]
        tensors = ShardTensors(latents, text, offsets_from_lengths([s.text_len for s in samples]), cond)
        payloads.append(ShardPayload(bucket, tensors, samples))
    committed = len({r["input_id"] for r in encoded})
    return payloads, quarantine, duplicates, committed


def write_partition(
    cache_url: str, partition_id: str, rows: list[ProducerRow], *, encoder_version: str, run_id: str, fault: FaultConfig
) -> PartitionOutcome:
    """Publish one partition; if another attempt already committed it, report that commit."""
    t0 = time.perf_counter()
    storage = CacheStorage(cache_url)
    existing = read_commit(storage, partition_id)
    if existing is not None:
        return outcome_from_record(existing, won=False, storage=storage)
    inputs = int(rows[0]["partition_inputs"]) if rows else 0
    # Duplicates only of committed samples: decided again now, against the commit records.
    rows, repoint = resolve_duplicates(storage, partition_id, rows)
    payloads, quarantine, duplicates, committed = rows_to_payloads(rows)
    result = publish_partition(
        storage,
        partition_id,
        inputs=inputs,
        shards=payloads,
        quarantine=quarantine,
        duplicates=duplicates,
        committed=committed,
        encoder_version=encoder_version,
        run_id=run_id,
        fault_hook=_fault_hook(fault),
    )
    if result.won and repoint:
        repoint_claims(storage, partition_id, repoint)
    if result.won:  # the committed samples are these payloads' (no read back)
        tokens = sum(s.text_len for p in payloads for s in p.samples)
        outcome = outcome_from_record(
            result.record, won=True, storage=storage, bytes_written=result.bytes_written, text_tokens=tokens
        )
    else:
        winner = read_commit(storage, partition_id) or result.record
        outcome = outcome_from_record(winner, won=False, storage=storage)
    outcome.stage_seconds = {
        k: [float(r[k]) for r in rows if r["kind"] == "encode"] for k in ("t_read", "t_decode", "t_vae", "t_text")
    }
    outcome.write_seconds = time.perf_counter() - t0
    return outcome
