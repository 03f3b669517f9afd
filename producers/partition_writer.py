"""Turn one partition's encoded rows into shards and publish them exactly once (a Ray task)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from megatron_qwenimage.cache.commit import read_commit
from megatron_qwenimage.cache.shard_format import Bucket, SampleMeta, ShardTensors, bytes_to_bf16, offsets_from_lengths
from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.cache.writer import DuplicateRow, QuarantineRow, ShardPayload, publish_partition
from producers.config import FaultConfig
from producers.dedup import repoint_claims, resolve_duplicates
from producers.row import ProducerRow


@dataclass
class PartitionOutcome:
    """What happened to one partition (from the winning commit record)."""

    partition_id: str
    won: bool  # this producer's attempt is the committed one
    inputs: int
    committed: int
    duplicates: int
    quarantined: dict[str, int]
    buckets: dict[str, int]
    bytes_written: int = 0
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)


def outcome_from_record(record, won: bool, bytes_written: int = 0) -> PartitionOutcome:
    buckets: dict[str, int] = {}
    for e in record.shards:
        buckets[e.bucket.name] = buckets.get(e.bucket.name, 0) + e.num_samples
    return PartitionOutcome(
        record.partition_id,
        won,
        record.inputs,
        record.committed,
        record.duplicates,
        dict(record.quarantined),
        buckets,
        bytes_written,
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
    storage = CacheStorage(cache_url)
    existing = read_commit(storage, partition_id)
    if existing is not None:
        return outcome_from_record(existing, won=False)
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
    record = result.record if result.won else read_commit(storage, partition_id)
    outcome = outcome_from_record(record, result.won, result.bytes_written)
    outcome.stage_seconds = {
        k: [float(r[k]) for r in rows if r["kind"] == "encode"] for k in ("t_read", "t_decode", "t_vae", "t_text")
    }
    return outcome
